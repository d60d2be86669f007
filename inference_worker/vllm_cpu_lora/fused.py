"""Each LoRA layer as one shrink and one expand per adapter slot: vLLM-CPU's ``add_lora_linear`` replaced.

Past the per-token gather (``grouped``), what made an adapter decode at ~55%
of the base model was per-call overhead, not arithmetic (torch.profiler over
32 decode steps of SmolLM2-135M): vLLM-CPU's ``PunicaWrapperCPU.add_lora_linear``
runs a shrink and an expand per slice of each projection (7 + 7 per decoder
layer), each through ``sgmv_*`` (vLLM v1 marks every CPU batch as prefill),
which rebuilds the per-token indices with ``repeat_interleave`` (a host sync)
and casts the weights to the compute dtype again, on every call.
``fused_add_lora_linear`` replaces it: the batch's rows per adapter slot are
worked out once per step (``rows``), and each layer's slices are applied as
one matmul into a float32 buffer (every slot's A matrices stacked, cast once)
and one matmul out of it (the B matrices as one block-diagonal matrix), cached
per layer and rebuilt whenever an adapter is written into the layer's weights
(their version counters move on every in-place write). Rows with index -1
(requests without an adapter) are left alone, as vLLM's GPU kernels and the
punica wrapper's contract have it; vLLM-CPU's gather would give them the last
slot's adapter in a batch that mixes them with adapter rows.

With the slices fused, torch's ops still cost ~20 us of dispatch per layer
call on a decode step's one to eight rows, so where lora_rows.c could be built
(``rows_kernel``) it applies each layer in one call with the same formula and
roundings; for activations other than bfloat16, or without a C compiler,
torch's ops serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference_worker.vllm_cpu_lora import rows_kernel
from inference_worker.vllm_cpu_lora.rows import RowGroups, step_rows

if TYPE_CHECKING:  # tensor methods only at run time
    import torch

__all__ = ["FusedLayer", "fused_add_lora_linear", "fused_layer"]


class FusedLayer:
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
        library = rows_kernel.load()
        count, _, max_rank, width = a[0].shape
        bf16 = all(t.dtype == torch.bfloat16 for t in self.tensors)  # the kernel's copies are the weights as they are
        self.kernel = None if library is None or not bf16 else rows_kernel.RowsKernel(
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


def fused_layer(wrapper: object, lora_a_stacked: tuple[torch.Tensor, ...], lora_b_stacked: tuple[torch.Tensor, ...],
                output_slices: tuple[int, ...]) -> FusedLayer | None:
    """The layer's fused weights, rebuilt when any of its tensors was written; None for a layout we do not fuse."""
    cache: dict[int, FusedLayer] = wrapper.__dict__.setdefault("_trainq_fused", {})
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
    entry = cache[id(lora_a_stacked)] = FusedLayer(lora_a_stacked, lora_b_stacked)
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
        indices, groups = step_rows(self)
        if indices.numel() == x2.shape[0]:
            if not groups:  # no row has an adapter
                return
            fused = fused_layer(self, lora_a_stacked, lora_b_stacked, output_slices)
    if fused is None:
        self._trainq_vllm_add_lora_linear(  # type: ignore[attr-defined]
            y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )
        return
    if not _apply_rows_kernel(fused, groups, x2, y2, indices, scale):
        _apply_torch_ops(fused, groups, x2, y2, scale, sum(output_slices))


def _apply_torch_ops(fused: FusedLayer, groups: RowGroups, x2: torch.Tensor, y2: torch.Tensor, scale: float,
                     width: int) -> None:
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


def _apply_rows_kernel(fused: FusedLayer, groups: RowGroups, x2: torch.Tensor, y2: torch.Tensor,
                       indices: torch.Tensor, scale: float) -> bool:
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
