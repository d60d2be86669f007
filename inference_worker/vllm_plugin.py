"""trainq's vLLM plugin: what the vLLM the inference worker starts needs on a CPU machine.

Two things, in each of vLLM's processes:

**AMX permission.** On x86 CPUs with AMX (Sapphire Rapids and later) Linux
kills a process that runs an AMX instruction without first asking the kernel
for the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``). oneDNN asks when it
first runs, but vLLM-CPU's own kernels may run AMX before that: on such a
machine the test suite's tiny model killed vLLM's worker with SIGILL on its
first request. ``torch._C._cpu._init_amx()`` asks (and is a no-op elsewhere).

**LoRA as one matmul per adapter.** vLLM-CPU applies LoRA with
``lora_ops.bgmv_*`` in plain torch: it gathers the adapter's weight matrix for
*every token* (``weights[indices]``, a ``tokens x out x rank`` copy) and
contracts with ``einsum``. On a batch of prompts that copy is hundreds of MB
per projection per layer: a demo step's 32 rollouts through an adapter ran at
5.5% of the base model's speed (bench/bench_rollout.py --kernels both). The
replacements below give the same results (same indexing, same dtype casts,
same slice and add semantics) with one ``x @ w.T`` per distinct adapter in the
batch, usually one. ``--no-grouped-lora`` on the inference worker keeps vLLM's.

vLLM loads every ``vllm.general_plugins`` entry point in each of its
processes; this one acts only when ``TRAINQ_VLLM_PLUGIN=1``, which the
inference worker sets for the vLLM it supervises, so a vLLM started by hand on
a machine where trainq is installed is left alone.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tensor methods only at run time: the inference worker imports this module without torch
    import torch

__all__ = ["ENABLE_FLAG", "GROUPED_LORA_FLAG", "bgmv_expand", "bgmv_expand_slice", "bgmv_shrink", "register"]

log = logging.getLogger("vllm.plugins.trainq")  # vLLM configures its own loggers' handlers, not the root's

ENABLE_FLAG = "TRAINQ_VLLM_PLUGIN"
GROUPED_LORA_FLAG = "TRAINQ_VLLM_GROUPED_LORA"


def register() -> None:
    """vLLM's plugin hook; does nothing unless the inference worker started this vLLM."""
    if os.environ.get(ENABLE_FLAG) != "1":
        return
    import torch

    init_amx = getattr(torch._C._cpu, "_init_amx", None)  # private torch API: tolerate its absence
    if init_amx is not None:
        init_amx()
    if os.environ.get(GROUPED_LORA_FLAG) == "1":
        _use_grouped_lora_kernels()


def _use_grouped_lora_kernels() -> None:
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as exc:  # another vLLM layout: serve with its own kernels rather than not at all
        log.warning("trainq: keeping vLLM's LoRA kernels (%s)", exc)
        return
    # punica_cpu imported its own references to the bgmv_* ops; its sgmv_* are lora_ops', which
    # call the module's bgmv_* by name, so replacing those in both modules covers all six.
    for module in (lora_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            setattr(module, name, globals()[name])
    log.info("trainq: vLLM-CPU LoRA uses one matmul per adapter (%s=1)", GROUPED_LORA_FLAG)


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
