"""Causal attention that runs per sequence, so packed rows cost what their sequences cost.

transformers' sdpa turns a packed row (position ids restarting at 0, no
attention mask) into a block-diagonal ``T x T`` mask. Every kernel that takes
a mask then computes all ``T^2`` scores and throws the off-diagonal blocks
away, and cannot take the flash path: on an H100, a 0.5B model's 16k-token
packed rows trained 1.44x slower than the same sequences padded. Here each
sequence of a row is one ``is_causal`` sdpa call: only its own triangle is
computed, with the flash kernel where the device has one; the same packed
rows then trained 1.78x faster than under the mask, and as fast as padded
(``bench/bench_trainer.py --device cuda``).

Right-padded rows (the ``padded`` layout, one sequence each) need no mask at
all: causality already keeps every real token from seeing the padding after
it, and what the padding positions compute is never trained. A decode step
(one new token, a KV cache) of an unpadded batch needs none either; anything
else (decoding a padded batch, left padding) gets the explicit
causal-and-padding mask transformers' sdpa would have built.

Registered with transformers as ``ATTENTION``, with a mask function that
hands the 2D padding mask through as it came: a model loaded with
``attn_implementation=ATTENTION`` never builds a ``T x T`` mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["ATTENTION", "register", "row_segments"]

ATTENTION = "trainq_segments"

# What was last read off each kind of tensor: every layer of one forward pass gets the
# same position ids and mask, and reading them off the GPU once per layer would stall its queue.
_last_read: dict[str, tuple[Tensor, int, Any]] = {}


def _read_once(kind: str, tensor: Tensor, read: Callable[[Tensor], Any]) -> Any:
    cached = _last_read.get(kind)
    if cached is not None and cached[0] is tensor and cached[1] == tensor._version:
        return cached[2]
    value = read(tensor.detach().cpu())
    _last_read[kind] = (tensor, tensor._version, value)
    return value


def row_segments(position_ids: Tensor) -> list[list[tuple[int, int]]]:
    """``[(start, end), ...]`` per row of ``(B, T)`` position ids: a sequence starts where they restart at 0."""
    return _read_once("segments", position_ids, _segments)


def _segments(position_ids: Tensor) -> list[list[tuple[int, int]]]:
    length = position_ids.shape[-1]
    spans = []
    for row in position_ids.reshape(-1, length):
        starts = (row == 0).nonzero().squeeze(-1).tolist()
        if not starts or starts[0] != 0:
            starts.insert(0, 0)  # a row that continues a sequence (positions not from 0) is one span
        spans.append(list(zip(starts, starts[1:] + [length])))
    return spans


def segment_attention(
    module: Any,
    query: Tensor,  # (B, H, Tq, D)
    key: Tensor,  # (B, KV, Tk, D)
    value: Tensor,  # (B, KV, Tk, D)
    attention_mask: Tensor | None,  # (B, Tk) padding mask, or None
    *,
    position_ids: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature; returns ``(B, Tq, H, D)`` and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        return sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None, **kwargs)[0]

    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{ATTENTION} takes a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    if key.shape[2] == query.shape[2]:  # no KV cache: a training forward
        if attention_mask is None and position_ids is not None:
            return _per_sequence(attend, query, key, value, row_segments(position_ids)), None
        if attention_mask is None or _read_once("padding", attention_mask, _is_right_padded):
            return attend(query, key, value), None
    elif query.shape[2] == 1 and (attention_mask is None or _read_once("no padding", attention_mask, _has_no_padding)):
        return attend(query, key, value), None  # one new token sees every cached one (sdpa: no causal mask at 1)
    # Decoding a padded batch, or left padding: the explicit mask sdpa would get from transformers.
    return attend(query, key, value, _explicit_mask(attention_mask, query.shape[2], key.shape[2], query.device)), None


def _per_sequence(attend: Callable[..., Tensor], query: Tensor, key: Tensor, value: Tensor,
                  spans_per_row: list[list[tuple[int, int]]]) -> Tensor:
    if len(spans_per_row) == 1:  # (1, T) position ids shared by every row
        spans_per_row = spans_per_row * query.shape[0]
    rows = []
    for b, spans in enumerate(spans_per_row):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        if len(spans) == 1:
            rows.append(attend(q, k, v))
        else:
            rows.append(torch.cat([attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in spans], dim=1))
    return torch.cat(rows, dim=0)  # (B, T, H, D)


def _is_right_padded(attention_mask: Tensor) -> bool:
    mask = attention_mask.bool()
    return not bool((mask[:, 1:] & ~mask[:, :-1]).any())  # once a row's mask turns 0 it stays 0


def _has_no_padding(attention_mask: Tensor) -> bool:
    return bool(attention_mask.bool().all())


def _explicit_mask(padding: Tensor | None, q_len: int, k_len: int, device: torch.device) -> Tensor:
    """``(B, 1, Tq, Tk)`` bool: causal (the queries are the last ``Tq`` positions) and not padding."""
    offset = k_len - q_len
    mask = torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset
    mask = mask[None, None]
    if padding is not None:
        mask = mask & padding.bool()[:, None, None, :]
    # A query that may see nothing (padding before any token) would come out NaN: let it see all.
    return mask | ~mask.any(dim=-1, keepdim=True)


def _padding_mask_as_given(*, attention_mask: Tensor | None = None, **_: Any) -> Tensor | None:
    return attention_mask


def register() -> str:
    """Make ``ATTENTION`` known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION, segment_attention)
    # Without a mask function of its own, transformers would drop the padding mask, and
    # every padding position (position id 0) would read as a one-token sequence.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, _padding_mask_as_given)
    return ATTENTION
