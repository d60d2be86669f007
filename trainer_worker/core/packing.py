"""Sequences -> micro-batches under a token budget.

``packed`` (the default) puts several sequences in one row, first-fit
decreasing by length. Position ids restart at 0 for each sequence and the
attention mask is left ``None``: the trainer's attention (``attention``) runs
each sequence of a row as its own causal attention, and transformers' own
implementations (5.x, ``masking_utils.find_packed_sequence_indices``) derive a
block-diagonal causal mask from the restarts, so packed sequences never see
each other. ``tests/unit/trainer/test_trainer_packing.py`` pins that packed
logits equal unpacked ones, under each implementation.

``padded`` sorts by length and right-pads rows of similar length; it is kept
as the baseline for the benchmark.

A sequence longer than the budget gets a micro-batch of its own (the budget is
a target, the model's position limit is the hard limit, checked at tokenize).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from trainer_worker.core.tokenize import TokenizedTrajectory

__all__ = ["MicroBatch", "PackingMode", "TrainSequence", "build_microbatches", "split_by_tokens"]

PackingMode = Literal["packed", "padded"]
Column: TypeAlias = "list | array"  # one per-token field of a sequence or row


@dataclass(frozen=True)
class TrainSequence:
    tokens: TokenizedTrajectory
    advantage: float


@dataclass(frozen=True)
class MicroBatch:
    input_ids: Tensor  # (B, T) long
    position_ids: Tensor  # (B, T) long, restarting at 0 per sequence
    attention_mask: Tensor | None  # (B, T) long for padded rows; None when packed
    loss_mask: Tensor  # (B, T) bool: sampled assistant tokens
    old_per_token_logps: Tensor  # (B, T) sampler logps; 0 where unknown
    logps_known: Tensor  # (B, T) bool: the sampler's logp is known
    temperatures: Tensor  # (B, T) float32: the temperature each token was sampled at (1.0 off the mask)
    advantages: Tensor  # (B, T) the advantage of each token's sequence
    sequence_ids: Tensor  # (B, T) long in [0, num_sequences); -1 on padding
    num_sequences: int

    @property
    def num_tokens(self) -> int:
        """Tokens the forward pass computes, padding included."""
        return self.input_ids.numel()


def build_microbatches(
    sequences: Sequence[TrainSequence],
    max_tokens: int,
    *,
    mode: PackingMode = "packed",
    pad_token_id: int = 0,
) -> list[MicroBatch]:
    """Group ``sequences`` into micro-batches of at most ``max_tokens`` tokens (padding included)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if mode == "packed":
        return [_pack_row([sequences[i] for i in row]) for row in _first_fit_decreasing(sequences, max_tokens)]
    if mode == "padded":
        return [_pad_rows([sequences[i] for i in rows], pad_token_id) for rows in _sorted_padded(sequences, max_tokens)]
    raise ValueError(f"unknown packing mode {mode!r}")


def split_by_tokens(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``lengths`` dealt into ``parts`` shares of about equal total length.

    Longest first, each to the share with the fewest tokens so far (the lowest
    share on a tie): Graham's LPT rule, within 4/3 of the best split. The same
    lengths always give the same shares, so every rank computes every rank's
    share without a word exchanged. Each share lists its indices ascending.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    shares: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = min(range(parts), key=lambda p: (loads[p], p))
        shares[target].append(index)
        loads[target] += lengths[index]
    return [sorted(share) for share in shares]


def _first_fit_decreasing(sequences: Sequence[TrainSequence], max_tokens: int) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i].tokens)):
        length = len(sequences[index].tokens)
        target = next((b for b, room in enumerate(free) if room >= length), None)
        if target is None:
            bins.append([index])
            free.append(max_tokens - length)
        else:
            bins[target].append(index)
            free[target] -= length
    return bins


def _sorted_padded(sequences: Sequence[TrainSequence], max_tokens: int) -> list[list[int]]:
    groups: list[list[int]] = []
    longest = 0
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i].tokens)):
        length = len(sequences[index].tokens)
        # Sorted longest first, so the group's first member sets its padded width.
        if groups and (len(groups[-1]) + 1) * longest <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
            longest = length
    return groups


def _columns(sequence: TrainSequence, seq_id: int) -> dict[str, Column]:
    t = sequence.tokens
    n = len(t)
    return {
        "input_ids": t.input_ids,
        "position_ids": list(range(n)),
        "loss_mask": t.assistant_mask,
        "old_per_token_logps": t.sampler_logprobs,
        "logps_known": t.logprobs_known,
        "temperatures": t.temperatures,
        "advantages": array("f", [sequence.advantage]) * n,
        "sequence_ids": [seq_id] * n,
    }


_DTYPES = {
    "input_ids": torch.long,
    "position_ids": torch.long,
    "loss_mask": torch.bool,
    "old_per_token_logps": torch.float32,
    "logps_known": torch.bool,
    "temperatures": torch.float32,
    "advantages": torch.float32,
    "sequence_ids": torch.long,
}


def _empty(name: str) -> Column:
    # float32 columns stay array("f"): the sampler's logprobs arrive so, and become a
    # tensor by copying bytes rather than by reading a Python float per token.
    return array("f") if _DTYPES[name] is torch.float32 else []


def _tensor(values: Column, dtype: torch.dtype) -> Tensor:
    if isinstance(values, array):
        return torch.frombuffer(values, dtype=dtype).clone() if values else torch.zeros(0, dtype=dtype)
    return torch.tensor(values, dtype=dtype)


def _pack_row(members: list[TrainSequence]) -> MicroBatch:
    row = {name: _empty(name) for name in _DTYPES}
    for seq_id, sequence in enumerate(members):
        for name, values in _columns(sequence, seq_id).items():
            row[name].extend(values)
    tensors = {name: _tensor(values, _DTYPES[name])[None] for name, values in row.items()}  # (1, T)
    return MicroBatch(attention_mask=None, num_sequences=len(members), **tensors)


def _pad_rows(members: list[TrainSequence], pad_token_id: int) -> MicroBatch:
    width = max(len(s.tokens) for s in members)
    pad_values = {
        "input_ids": pad_token_id,
        "position_ids": 0,
        "loss_mask": False,
        "old_per_token_logps": 0.0,
        "logps_known": False,
        "temperatures": 1.0,
        "advantages": 0.0,
        "sequence_ids": -1,
    }
    rows: dict[str, list[Tensor]] = {name: [] for name in _DTYPES}
    attention: list[list[int]] = []
    for seq_id, sequence in enumerate(members):
        pad = width - len(sequence.tokens)
        for name, values in _columns(sequence, seq_id).items():
            padded = _empty(name)
            padded.extend(values)
            padded.extend([pad_values[name]] * pad)
            rows[name].append(_tensor(padded, _DTYPES[name]))
        attention.append([1] * len(sequence.tokens) + [0] * pad)
    tensors = {name: torch.stack(values) for name, values in rows.items()}  # (B, T)
    return MicroBatch(
        attention_mask=torch.tensor(attention, dtype=torch.long), num_sequences=len(members), **tensors
    )
