"""The grouped bgmv ops give what vLLM-CPU's per-token-gather ops give, on the same inputs."""

from __future__ import annotations

import pytest
import torch

from inference_worker.vllm_cpu_lora import grouped

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops", reason="vLLM is not installed")

SLOTS, IN, OUT, RANK, TOKENS = 4, 48, 40, 8, 37


def _indices(kind: str) -> torch.Tensor:
    if kind == "one adapter":
        return torch.full((TOKENS,), 2, dtype=torch.long)
    if kind == "mixed":  # several adapters and the last slot by -1, as a batch of mixed requests
        return torch.tensor([0, 2, -1, 1, 2, 2, 0][: TOKENS] * 6, dtype=torch.long)[:TOKENS]
    return torch.zeros((1,), dtype=torch.long)  # a single token


def _weights(shape: tuple[int, ...], four_d: bool) -> torch.Tensor:
    w = torch.randn(SLOTS, *shape, dtype=torch.bfloat16)
    return w.unsqueeze(1) if four_d else w


@pytest.mark.parametrize("kind", ["one adapter", "mixed", "single token"])
@pytest.mark.parametrize("four_d", [False, True])
def test_shrink_matches_vllm(kind: str, four_d: bool) -> None:
    torch.manual_seed(0)
    indices = _indices(kind)
    x = torch.randn(indices.numel(), IN, dtype=torch.bfloat16)
    a = _weights((RANK, IN), four_d)
    expected, got = torch.zeros(indices.numel(), RANK), torch.zeros(indices.numel(), RANK)
    lora_ops.bgmv_shrink(x, a, expected, indices, 0.5)
    grouped.bgmv_shrink(x, a, got, indices, 0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["one adapter", "mixed", "single token"])
@pytest.mark.parametrize("add_inputs", [False, True])
@pytest.mark.parametrize("padded_out", [0, 8])
def test_expand_matches_vllm(kind: str, add_inputs: bool, padded_out: int) -> None:
    torch.manual_seed(1)
    indices = _indices(kind)
    x = torch.randn(indices.numel(), RANK)
    b = _weights((OUT + padded_out, RANK), four_d=True)
    start = torch.randn(indices.numel(), OUT, dtype=torch.bfloat16)
    expected, got = start.clone(), start.clone()
    lora_ops.bgmv_expand(x, b, expected, indices, add_inputs)
    grouped.bgmv_expand(x, b, got, indices, add_inputs)
    torch.testing.assert_close(got, expected)


def test_expand_broadcasts_one_row_like_vllm() -> None:
    x = torch.randn(1, RANK)
    b = _weights((OUT, RANK), four_d=False)
    indices = torch.tensor([3])
    expected, got = torch.ones(5, OUT, dtype=torch.bfloat16), torch.ones(5, OUT, dtype=torch.bfloat16)
    lora_ops.bgmv_expand(x, b, expected, indices, True)
    grouped.bgmv_expand(x, b, got, indices, True)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("add_inputs", [False, True])
def test_expand_slice_matches_vllm(add_inputs: bool) -> None:
    torch.manual_seed(2)
    indices = _indices("mixed")
    x = torch.randn(TOKENS, RANK)
    b = _weights((OUT, RANK), four_d=True)
    start = torch.randn(TOKENS, 3 * OUT, dtype=torch.bfloat16)
    expected, got = start.clone(), start.clone()
    lora_ops.bgmv_expand_slice(x, b, expected, indices, OUT, OUT, add_inputs)
    grouped.bgmv_expand_slice(x, b, got, indices, OUT, OUT, add_inputs)
    torch.testing.assert_close(got, expected)
