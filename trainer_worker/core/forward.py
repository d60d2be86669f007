"""Per-token log-probabilities of a micro-batch under the model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from trainer_worker.core.packing import MicroBatch

__all__ = ["per_token_logps", "token_logps_from_logits"]

_CHUNK_TOKENS = 2048


def per_token_logps(model: Any, batch: MicroBatch, device: torch.device | str) -> Tensor:
    """``(B, T)`` log-probability of each token given the tokens before it.

    A sequence's first token (position id 0) gets 0: in a packed row the logit
    before it belongs to the previous sequence.

    Packed rows pass ``attention_mask=None`` with restarting ``position_ids``, which
    transformers turns into a block-diagonal causal mask (see ``packing``).
    """
    input_ids = batch.input_ids.to(device)
    attention_mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    logits = model(
        input_ids=input_ids,
        position_ids=batch.position_ids.to(device),
        attention_mask=attention_mask,
        use_cache=False,
    ).logits  # (B, T, V)
    position_ids = batch.position_ids.to(device)
    return torch.where(position_ids == 0, 0.0, token_logps_from_logits(logits, input_ids))  # (B, T)


def token_logps_from_logits(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Shifted gather of ``log_softmax(logits)`` at the next token, in float32.

    Computed in token chunks so the float32 copy of a ``(T, V)`` vocabulary slab
    stays small on large vocabularies.
    """
    batch_size, length, _ = logits.shape
    targets = input_ids[:, 1:]  # (B, T-1)
    pieces = []
    for start in range(0, length - 1, _CHUNK_TOKENS):
        stop = min(start + _CHUNK_TOKENS, length - 1)
        chunk = logits[:, start:stop].float()  # (B, c, V)
        picked = chunk.gather(-1, targets[:, start:stop].unsqueeze(-1)).squeeze(-1)  # (B, c)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    first = torch.zeros(batch_size, 1, dtype=torch.float32, device=logits.device)  # nothing predicts t = 0
    return torch.cat([first, *pieces], dim=1)  # (B, T)
