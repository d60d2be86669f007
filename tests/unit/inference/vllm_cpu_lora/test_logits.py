"""Prompt logprobs of several requests through LoRA: vLLM-CPU's add_lora_logits gets every prompt row."""

from __future__ import annotations

import pytest
import torch

from inference_worker.vllm_cpu_lora import logits
from tests.support.punica import HIDDEN, MAPPINGS, MAX_LORAS, MAX_RANK, punica_wrapper, set_mapping

pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu", reason="vLLM is not installed")


VOCAB = 32


def _logits_case(lm_head_b: float) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two requests (5 prompt rows) with adapters 1 and 2; lm_head LoRA A random, B filled with ``lm_head_b``."""
    from vllm.lora.layers import LoRAMapping

    wrapper = punica_wrapper(MAPPINGS["one adapter"])
    wrapper.update_metadata(LoRAMapping((1, 1, 1, 2, 2), (1, 2), is_prefill=True), [1, 2, 3, None], MAX_LORAS, VOCAB)
    wrapper._trainq_vllm_add_lora_logits = type(wrapper).__dict__.get(
        "_trainq_vllm_add_lora_logits", type(wrapper).add_lora_logits).__get__(wrapper)
    a = torch.randn(MAX_LORAS, 1, MAX_RANK, HIDDEN, dtype=torch.bfloat16)
    b = torch.full((MAX_LORAS, 1, VOCAB, MAX_RANK), lm_head_b, dtype=torch.bfloat16)
    return wrapper, torch.randn(5, HIDDEN, dtype=torch.bfloat16), torch.randn(5, VOCAB, dtype=torch.bfloat16), a, b


def test_prompt_rows_of_several_requests_pass_when_no_adapter_updates_lm_head() -> None:
    wrapper, x, y, a, b = _logits_case(lm_head_b=0.0)
    before = y.clone()
    with pytest.raises(RuntimeError):  # vLLM's own method: one index per request against 5 rows
        wrapper._trainq_vllm_add_lora_logits(y.clone(), x, a, b, 1.0)

    logits.add_lora_logits(wrapper, y, x, a, b, 1.0)

    assert torch.equal(y, before)  # nothing to add: every lm_head B is zero


def test_an_adapter_that_updates_lm_head_still_gets_vllms_method() -> None:
    wrapper, x, y, a, b = _logits_case(lm_head_b=0.5)
    with pytest.raises(RuntimeError):  # as vLLM's own: rows and indices disagree, and there is something to add
        logits.add_lora_logits(wrapper, y, x, a, b, 1.0)

    set_mapping(wrapper, (1, 1, 2, 2, 1))  # one row per request, as when sampling: they agree
    before, expected = y.clone(), y.clone()
    wrapper._trainq_vllm_add_lora_logits(expected, x, a, b, 1.0)
    logits.add_lora_logits(wrapper, y, x, a, b, 1.0)
    torch.testing.assert_close(y, expected)
    assert not torch.equal(y, before)


def test_a_zero_lm_head_skips_vllms_method_on_every_step_until_an_adapter_writes_one() -> None:
    wrapper, x, y, a, b = _logits_case(lm_head_b=0.0)
    set_mapping(wrapper, (1, 1, 2, 2, 1))  # one row per request, as when sampling
    calls = []
    vllms = wrapper._trainq_vllm_add_lora_logits
    wrapper._trainq_vllm_add_lora_logits = lambda *args, **kwargs: calls.append(1) or vllms(*args, **kwargs)
    before = y.clone()
    for _ in range(3):
        logits.add_lora_logits(wrapper, y, x, a, b, 1.0)
    assert torch.equal(y, before) and not calls

    b[1, 0, :, :4] = 0.5  # an adapter with an lm_head update written into slot 1, in place
    expected = y.clone()
    vllms(expected, x, a, b, 1.0)
    logits.add_lora_logits(wrapper, y, x, a, b, 1.0)
    assert calls == [1]
    torch.testing.assert_close(y, expected)
    assert not torch.equal(y, before)
