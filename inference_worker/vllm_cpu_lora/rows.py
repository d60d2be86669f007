"""A batch's rows per adapter slot, worked out once per step rather than once per LoRA layer.

vLLM-CPU's punica wrapper rebuilds its per-token indices on every LoRA call
(``repeat_interleave``, a host sync); a decode step of SmolLM2-135M makes 120
such calls. The fused layers (``fused``) and the compiled graph's op
(``compilation``) read the rows per slot from here instead, cached on the
wrapper until its next metadata update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # tensor methods only at run time
    import torch

__all__ = ["RowGroups", "row_groups", "step_rows"]

# ``(slot, rows)`` per adapter slot of a batch: rows a slice where they are contiguous, else their indices.
RowGroups: TypeAlias = "list[tuple[int, slice | torch.Tensor]]"


def row_groups(indices: torch.Tensor) -> RowGroups:
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
    groups: RowGroups = []
    for slot, spans in segments.items():
        if len(spans) == 1:
            groups.append((slot, slice(*spans[0])))
        else:
            groups.append((slot, torch.cat([torch.arange(a, b, device=indices.device) for a, b in spans])))
    return groups


def step_rows(wrapper: object) -> tuple[torch.Tensor, RowGroups]:
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
