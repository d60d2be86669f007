"""Fixtures for inference_worker/vllm_cpu_lora's tests: a real ``PunicaWrapperCPU``, its mappings, stacked weights."""

from __future__ import annotations

import pytest
import torch

MAX_LORAS, MAX_RANK, HIDDEN = 4, 16, 64
LAYOUTS = {"qkv": (HIDDEN, 16, 16), "gate_up": (96, 96), "o": (HIDDEN,)}
# Rows per LoRA id (0: the base model, no adapter), as vLLM's token mapping gives them for a batch.
MAPPINGS = {
    "one adapter": (1,) * 9,
    "single token": (2,),
    "mixed": (1, 1, 1, 0, 0, 3, 3, 1, 1, 0, 2, 2, 2, 1),  # adapter 1 in two runs, base rows between
    "base only": (0,) * 5,
}
LORA_IDS = [1, 2, 3, None]  # slot -> adapter id; the last slot is free, as -1 rows would read it in vLLM's gather


def punica_wrapper(token_ids: tuple[int, ...], lora_index_to_id: list[int | None] = LORA_IDS):  # type: ignore[no-untyped-def]
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    wrapper = punica_cpu.PunicaWrapperCPU(max_num_batched_tokens=max(64, len(token_ids)), max_batches=16, device="cpu")
    # The fused method's fallback, as register() leaves it on the class.
    wrapper._trainq_vllm_add_lora_linear = original_add_lora_linear().__get__(wrapper)
    set_mapping(wrapper, token_ids, lora_index_to_id)
    return wrapper


def original_add_lora_linear():  # type: ignore[no-untyped-def]
    """vLLM's own ``PunicaWrapperCPU.add_lora_linear``, also where register() or a test replaced it on the class."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    return PunicaWrapperCPU.__dict__.get("_trainq_vllm_add_lora_linear") or PunicaWrapperCPU.add_lora_linear


def rows_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each call of ``fused._apply_rows_kernel`` returns (True: lora_rows.c did the layer from Python)."""
    from inference_worker.vllm_cpu_lora import fused

    taken: list[bool] = []
    apply = fused._apply_rows_kernel

    def spy(*args: object) -> bool:
        taken.append(apply(*args))  # type: ignore[arg-type]
        return taken[-1]

    monkeypatch.setattr(fused, "_apply_rows_kernel", spy)
    return taken


def set_mapping(wrapper, token_ids: tuple[int, ...], lora_index_to_id: list[int | None] = LORA_IDS) -> None:  # type: ignore[no-untyped-def]
    from vllm.lora.layers import LoRAMapping

    # vLLM v1 marks every CPU batch as prefill (v1/worker/lora_model_runner_mixin.py), as here.
    wrapper.update_metadata(LoRAMapping(token_ids, token_ids, is_prefill=True), lora_index_to_id, MAX_LORAS, 32000)


def stacked_weights(slices: tuple[int, ...], rank: int = 8) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """vLLM's stacked layout, adapters of ``rank`` in slots 0-2 (zero-padded to MAX_RANK), the last slot zero."""
    a = tuple(torch.zeros(MAX_LORAS, 1, MAX_RANK, HIDDEN, dtype=torch.bfloat16) for _ in slices)
    b = tuple(torch.zeros(MAX_LORAS, 1, out, MAX_RANK, dtype=torch.bfloat16) for out in slices)
    for slot in range(MAX_LORAS - 1):
        for a_slice, b_slice in zip(a, b):
            a_slice[slot, 0, :rank].copy_(torch.randn(rank, HIDDEN) / 8)
            b_slice[slot, 0, :, :rank].copy_(torch.randn(b_slice.shape[2], rank))
    return a, b
