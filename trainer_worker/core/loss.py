"""Policy-gradient losses as pure functions over named tensors.

Every per-token tensor is ``(B, T)`` and aligned with the micro-batch's
``input_ids``: position ``t`` holds a quantity about token ``t`` (its
log-probability given tokens ``< t``). Sequences may be packed several to a row;
``sequence_ids`` says which sequence each token belongs to.

Aggregation is the token-level mean of DAPO (Yu et al. 2025, arXiv:2503.14476,
section 3.3): every trained token of the *step* weighs the same, so a micro-batch
divides its sums by ``token_normalizer``, the step's trained-token count, and
the micro-batches' losses (and metrics) add up to the step's means under
gradient accumulation. The sequence-level ratio only changes the ratio, not
this aggregation.

Variants are types: ``PPOClip`` or ``CISPO``, chosen by ``LossConfig.objective``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "CISPO",
    "CISPO_EPSILON_HIGH",
    "PPO_EPSILON",
    "LossConfig",
    "LossInputs",
    "LossOutputs",
    "PPOClip",
    "compute_loss",
    "k3_kl",
    "loss_config_from_train_config",
]

PPO_EPSILON = 0.2
"""PPO's clip range (Schulman et al. 2017, arXiv:1707.06347)."""
CISPO_EPSILON_HIGH = 0.28
"""CISPO's upper truncation of the importance weight. MiniMax-M1 (arXiv:2506.13585)
tunes only the upper bound; 0.28 is DAPO's clip-higher value (arXiv:2503.14476),
which keeps the weight near the trust region PPO users know."""


@dataclass(frozen=True)
class PPOClip:
    """PPO clipped surrogate: ``-min(r A, clip(r, 1-epsilon, 1+epsilon_high) A)``."""

    epsilon: float = PPO_EPSILON
    epsilon_high: float = PPO_EPSILON


@dataclass(frozen=True)
class CISPO:
    """CISPO (MiniMax-M1, arXiv:2506.13585, eq. 4): ``-sg(min(r, 1+epsilon_high)) A log pi``.

    The weight is clipped and detached, so every token keeps a gradient (through
    ``log pi``) however far its ratio moved; there is no lower bound.
    """

    epsilon_high: float = CISPO_EPSILON_HIGH


@dataclass(frozen=True)
class LossConfig:
    objective: PPOClip | CISPO = CISPO()
    importance_sampling_level: Literal["token", "sequence"] = "token"
    beta: float = 0.0
    """Weight of the k3 KL to the reference; 0 means no reference forward at all."""


def loss_config_from_train_config(config: object) -> LossConfig:
    """The ``LossConfig`` of a ``producer.types.TrainConfig`` (defaults filled in here)."""
    epsilon = getattr(config, "epsilon")
    epsilon_high = getattr(config, "epsilon_high")
    objective: PPOClip | CISPO
    if getattr(config, "ppo"):
        low = PPO_EPSILON if epsilon is None else epsilon
        objective = PPOClip(epsilon=low, epsilon_high=low if epsilon_high is None else epsilon_high)
    else:
        objective = CISPO(epsilon_high=CISPO_EPSILON_HIGH if epsilon_high is None else epsilon_high)
    return LossConfig(
        objective=objective,
        importance_sampling_level=getattr(config, "importance_sampling_level"),
        beta=getattr(config, "beta"),
    )


@dataclass(frozen=True)
class LossInputs:
    per_token_logps: Tensor  # (B, T) log pi_theta(token), with grad
    old_per_token_logps: Tensor  # (B, T) the sampler's log pi_old(token); only under loss_mask
    advantages: Tensor  # (B, T) the advantage of the token's sequence
    loss_mask: Tensor  # (B, T) bool: sampled assistant tokens
    sequence_ids: Tensor  # (B, T) long in [0, num_sequences); any value off the mask
    num_sequences: int
    ref_per_token_logps: Tensor | None = None  # (B, T) log pi_ref(token), no grad
    token_normalizer: float | None = None
    """Trained tokens of the whole step; defaults to this micro-batch's."""


@dataclass(frozen=True)
class LossOutputs:
    loss: Tensor  # () scalar to backpropagate
    metrics: dict[str, float]
    """This micro-batch's share of the step's means: ``loss``, ``policy_loss``, ``kl``,
    ``clip_fraction``, ``ratio_mean``. Sum them over micro-batches."""


def compute_loss(inputs: LossInputs, config: LossConfig) -> LossOutputs:
    """The policy loss (+ ``beta`` * k3 KL) of one micro-batch, and its metrics."""
    mask = inputs.loss_mask
    maskf = mask.to(inputs.per_token_logps.dtype)  # (B, T)
    normalizer = max(float(inputs.token_normalizer or mask.sum().item()), 1.0)
    # Off the mask the old logps are meaningless; zero the log-ratio there so exp() stays finite.
    log_ratio = torch.where(mask, inputs.per_token_logps - inputs.old_per_token_logps, 0.0)  # (B, T)
    if config.importance_sampling_level == "sequence":
        log_ratio = _sequence_log_ratio(log_ratio, inputs)
    ratio = torch.exp(log_ratio)  # (B, T)

    if isinstance(config.objective, PPOClip):
        per_token_loss, clipped = _ppo_clip(ratio, inputs.advantages, config.objective)
    else:
        per_token_loss, clipped = _cispo(ratio, inputs.advantages, inputs.per_token_logps, config.objective)
    policy_loss = (per_token_loss * maskf).sum() / normalizer

    kl = torch.zeros((), dtype=policy_loss.dtype, device=policy_loss.device)
    if config.beta > 0:
        if inputs.ref_per_token_logps is None:
            raise ValueError("beta > 0 needs ref_per_token_logps")
        kl = (k3_kl(inputs.per_token_logps, inputs.ref_per_token_logps) * maskf).sum() / normalizer
    loss = policy_loss + config.beta * kl

    metrics = {
        "loss": loss.item(),
        "policy_loss": policy_loss.item(),
        "kl": kl.item(),
        "clip_fraction": (clipped.to(maskf.dtype) * maskf).sum().item() / normalizer,
        "ratio_mean": (ratio.detach() * maskf).sum().item() / normalizer,
    }
    return LossOutputs(loss=loss, metrics=metrics)


def _sequence_log_ratio(log_ratio: Tensor, inputs: LossInputs) -> Tensor:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071, eq. 7): one ratio per sequence,
    the exp of its length-normalised log-ratio, broadcast back to its tokens."""
    maskf = inputs.loss_mask.to(log_ratio.dtype)
    ids = torch.where(inputs.loss_mask, inputs.sequence_ids, 0).flatten()  # (B*T,)
    sums = torch.zeros(inputs.num_sequences, dtype=log_ratio.dtype, device=log_ratio.device)
    sums = sums.index_add(0, ids, (log_ratio * maskf).flatten())  # (S,)
    counts = torch.zeros_like(sums).index_add(0, ids, maskf.flatten()).clamp(min=1.0)  # (S,)
    return (sums / counts)[ids].view_as(log_ratio)  # (B, T)


def _ppo_clip(ratio: Tensor, advantages: Tensor, objective: PPOClip) -> tuple[Tensor, Tensor]:
    """PPO-clip (arXiv:1707.06347, eq. 7) with DAPO's decoupled upper bound."""
    clipped_ratio = ratio.clamp(1.0 - objective.epsilon, 1.0 + objective.epsilon_high)
    unclipped_obj = ratio * advantages  # (B, T)
    clipped_obj = clipped_ratio * advantages  # (B, T)
    per_token_loss = -torch.minimum(unclipped_obj, clipped_obj)
    # Clipped where the clipped term is the one min() picks, i.e. the gradient is cut.
    clipped = (clipped_obj < unclipped_obj).detach()
    return per_token_loss, clipped


def _cispo(ratio: Tensor, advantages: Tensor, per_token_logps: Tensor, objective: CISPO) -> tuple[Tensor, Tensor]:
    """CISPO (arXiv:2506.13585, eq. 4): REINFORCE weighted by the truncated, detached ratio."""
    weight = ratio.clamp(max=1.0 + objective.epsilon_high).detach()  # (B, T)
    per_token_loss = -weight * advantages * per_token_logps
    clipped = (ratio > 1.0 + objective.epsilon_high).detach()
    return per_token_loss, clipped


def k3_kl(per_token_logps: Tensor, ref_per_token_logps: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token (Schulman 2020, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html): ``exp(d) - d - 1`` with
    ``d = log pi_ref - log pi``; unbiased, always >= 0."""
    delta = ref_per_token_logps - per_token_logps  # (B, T)
    return torch.exp(delta) - delta - 1.0
