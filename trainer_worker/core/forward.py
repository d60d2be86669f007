"""Per-token log-probabilities of a micro-batch under the model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from trainer_worker.core.packing import MicroBatch

__all__ = ["per_token_logps", "token_logps_at"]

_CHUNK_TOKENS = 2048


def per_token_logps(model: Any, batch: MicroBatch, device: torch.device | str) -> Tensor:
    """``(B, T)`` log-probability of each trained token given the tokens before it; 0 elsewhere.

    Each token is scored at the temperature it was sampled at (logits divided
    by it), the distribution the sampler drew it from and reported its logprob under.

    Only the positions that predict a trained token (``loss_mask``) go through
    the LM head: prompts are most of a sequence, and a full-vocabulary logit
    row per prompt token (49k floats on SmolLM2) would dominate memory and the
    head's FLOPs for values nobody reads.

    Packed rows pass ``attention_mask=None`` with restarting ``position_ids``: each
    sequence attends only to itself (see ``packing`` and ``attention``).
    """
    input_ids = batch.input_ids.to(device)
    position_ids = batch.position_ids.to(device)
    attention_mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    # Position t-1 predicts token t; a sequence's first token (position id 0) is never trained.
    wanted = batch.loss_mask.to(device) & (position_ids > 0)  # (B, T)
    predictors = wanted[:, 1:].any(dim=0).nonzero().squeeze(-1)  # (K,) positions whose logits are needed
    logits = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=False,
        logits_to_keep=predictors,
    ).logits  # (B, K, V)
    targets = input_ids[:, predictors + 1]  # (B, K)
    temperatures = batch.temperatures.to(device)[:, predictors + 1]  # (B, K)
    picked = token_logps_at(logits, targets, temperatures)  # (B, K)
    logps = torch.zeros(input_ids.shape, dtype=picked.dtype, device=logits.device)  # (B, T)
    logps[:, predictors + 1] = picked
    return torch.where(wanted, logps, 0.0)


def token_logps_at(logits: Tensor, targets: Tensor, temperatures: Tensor | None = None) -> Tensor:
    """``(B, K)`` ``log_softmax(logits / temperature)[..., target]`` in float32 (float64 for float64
    logits), for logits ``(B, K, V)``.

    ``temperatures`` is ``(B, K)`` (1 when ``None``). Computed in chunks so the
    float32 copy of a ``(K, V)`` vocabulary slab stays small.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    pieces = []
    for start in range(0, logits.shape[1], _CHUNK_TOKENS):
        chunk = logits[:, start : start + _CHUNK_TOKENS].to(dtype)  # (B, c, V)
        if temperatures is not None:
            chunk = chunk / temperatures[:, start : start + _CHUNK_TOKENS].unsqueeze(-1).to(dtype)  # (B, c, V)
        picked = chunk.gather(-1, targets[:, start : start + _CHUNK_TOKENS].unsqueeze(-1)).squeeze(-1)  # (B, c)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces, dim=1) if pieces else logits.new_zeros(targets.shape, dtype=dtype)
