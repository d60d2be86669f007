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
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from producer.types import TrainConfig

__all__ = [
    "CISPO",
    "ImportanceSamplingLevel",
    "CISPO_EPSILON_HIGH",
    "PPO_EPSILON",
    "LossConfig",
    "LossInputs",
    "LossOutputs",
    "PPOClip",
    "compute_loss",
    "k3_kl",
    "loss_config_from_train_config",
    "mismatch_metrics",
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

    @property
    def bounds(self) -> tuple[float, float]:
        return 1.0 - self.epsilon, 1.0 + self.epsilon_high


@dataclass(frozen=True)
class CISPO:
    """CISPO (MiniMax-M1, arXiv:2506.13585, eq. 4): ``-sg(clip(r, 1-epsilon, 1+epsilon_high)) A log pi``.

    The weight is clipped and detached, so every token keeps a gradient (through
    ``log pi``) however far its ratio moved. MiniMax-M1 sets no lower bound
    (``epsilon=None``).
    """

    epsilon_high: float = CISPO_EPSILON_HIGH
    epsilon: float | None = None

    @property
    def bounds(self) -> tuple[float, float]:
        return (0.0 if self.epsilon is None else 1.0 - self.epsilon), 1.0 + self.epsilon_high


ImportanceSamplingLevel = Literal["token", "sequence", "average", "geometric_average"]


@dataclass(frozen=True)
class LossConfig:
    objective: PPOClip | CISPO = CISPO()
    importance_sampling_level: ImportanceSamplingLevel = "token"
    beta: float = 0.0
    """Weight of the k3 KL to the reference; 0 means no reference forward at all."""
    max_negative_advantage_weight: float | None = None
    """Cap of the importance ratio of tokens with a negative advantage."""
    mask_prob_ratio: bool = False
    """Drop tokens whose ratio is outside the objective's bounds from the loss."""
    truncated_importance_sampling: float | None = None
    """Truncated importance sampling's cap (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
    You Off-Policy RL Training"): each token weighs ``min(pi_theta / pi_sampler, cap)``, detached, and the
    policy ratio is taken against the trainer's own log-probabilities instead of the sampler's."""
    kimi_k2_tau: float | None = None
    """Kimi K2 (arXiv:2507.20534, section 3.4.1): advantages less ``tau * (log pi_theta - log pi_sampler)``."""


def loss_config_from_train_config(config: TrainConfig) -> LossConfig:
    """The ``LossConfig`` of a ``producer.types.TrainConfig`` (defaults filled in here)."""
    objective: PPOClip | CISPO
    if config.ppo:
        low = PPO_EPSILON if config.epsilon is None else config.epsilon
        objective = PPOClip(epsilon=low, epsilon_high=low if config.epsilon_high is None else config.epsilon_high)
    else:
        high = CISPO_EPSILON_HIGH if config.epsilon_high is None else config.epsilon_high
        objective = CISPO(epsilon_high=high, epsilon=config.epsilon)
    return LossConfig(
        objective=objective,
        importance_sampling_level=config.importance_sampling_level,
        beta=config.beta,
        max_negative_advantage_weight=config.max_negative_advantage_importance_sampling_weight,
        mask_prob_ratio=config.mask_prob_ratio,
        truncated_importance_sampling=config.truncated_importance_sampling,
        kimi_k2_tau=config.kimi_k2_tau,
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
    sampler_logps_known: Tensor | None = None  # (B, T) bool: old_per_token_logps are the sampler's (all, if None)
    known_token_normalizer: float | None = None
    """Trained tokens of the whole step with the sampler's logprob; defaults to this micro-batch's."""


@dataclass(frozen=True)
class LossOutputs:
    loss: Tensor  # () scalar to backpropagate
    metrics: dict[str, float]
    """This micro-batch's share of the step's means: ``loss``, ``policy_loss``, ``kl``,
    ``clip_fraction``, ``ratio_mean`` and the ``mismatch_*`` means. Sum them over micro-batches."""
    max_metrics: dict[str, float]
    """Maxima over this micro-batch (``mismatch_ratio_max``): take the max over micro-batches."""


def compute_loss(inputs: LossInputs, config: LossConfig) -> LossOutputs:
    """The policy loss (+ ``beta`` * k3 KL) of one micro-batch, and its metrics."""
    mask = inputs.loss_mask
    maskf = mask.to(inputs.per_token_logps.dtype)  # (B, T)
    normalizer = max(float(inputs.token_normalizer or mask.sum().item()), 1.0)
    # Off the mask the old logps are meaningless; zero the log-ratio there so exp() stays finite.
    sampler_log_ratio = torch.where(mask, inputs.per_token_logps - inputs.old_per_token_logps, 0.0)  # (B, T)
    log_ratio = sampler_log_ratio
    tis_weight = None
    if config.truncated_importance_sampling is not None:
        # The mismatch goes into a detached weight; the ratio the objective sees is against
        # the trainer itself (1 in value, the policy gradient in its gradient).
        tis_weight = torch.exp(sampler_log_ratio.detach()).clamp(max=config.truncated_importance_sampling)
        log_ratio = torch.where(mask, inputs.per_token_logps - inputs.per_token_logps.detach(), 0.0)
    ratio = _importance_ratio(log_ratio, inputs, config.importance_sampling_level)  # (B, T)
    if config.max_negative_advantage_weight is not None:
        capped = ratio.clamp(max=config.max_negative_advantage_weight)
        ratio = torch.where(inputs.advantages < 0, capped, ratio)
    advantages = inputs.advantages
    if config.kimi_k2_tau is not None:
        advantages = advantages - config.kimi_k2_tau * sampler_log_ratio.detach()

    if isinstance(config.objective, PPOClip):
        per_token_loss, clipped = _ppo_clip(ratio, advantages, config.objective)
    else:
        per_token_loss, clipped = _cispo(ratio, advantages, inputs.per_token_logps, config.objective)
    if config.mask_prob_ratio:
        low, high = config.objective.bounds
        per_token_loss = torch.where((ratio > low) & (ratio < high), per_token_loss, 0.0)
    if tis_weight is not None:
        per_token_loss = per_token_loss * tis_weight
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
    mismatch, maxima = mismatch_metrics(inputs)
    return LossOutputs(loss=loss, metrics={**metrics, **mismatch}, max_metrics=maxima)


def mismatch_metrics(inputs: LossInputs) -> tuple[dict[str, float], dict[str, float]]:
    """How far the trainer's log-probabilities of the sampled tokens are from the sampler's.

    Measured before the step's update (the forward pass that computes the
    loss), over the trained tokens with a sampler logprob. Means (shares of
    the step's, like the loss's): ``mismatch_kl_k3``, the k3 estimate of
    KL(sampler || trainer) (Schulman 2020; samples are the sampler's);
    ``mismatch_logprob_abs_diff``; ``mismatch_ratio_mean`` of
    ``pi_trainer / pi_sampler``. Maximum: ``mismatch_ratio_max``.
    """
    known = inputs.loss_mask if inputs.sampler_logps_known is None else inputs.loss_mask & inputs.sampler_logps_known
    knownf = known.to(inputs.per_token_logps.dtype)  # (B, T)
    normalizer = max(float(inputs.known_token_normalizer or known.sum().item()), 1.0)
    trainer = inputs.per_token_logps.detach()
    diff = torch.where(known, trainer - inputs.old_per_token_logps, 0.0)  # (B, T) log pi_trainer - log pi_sampler
    ratio = torch.exp(diff)  # (B, T)
    k3 = k3_kl(torch.where(known, inputs.old_per_token_logps, 0.0), torch.where(known, trainer, 0.0))
    means = {
        "mismatch_kl_k3": (k3 * knownf).sum().item() / normalizer,
        "mismatch_logprob_abs_diff": (diff.abs() * knownf).sum().item() / normalizer,
        "mismatch_ratio_mean": (ratio * knownf).sum().item() / normalizer,
    }
    maxima = {"mismatch_ratio_max": ratio[known].max().item() if known.any() else 0.0}
    return means, maxima


def _importance_ratio(log_ratio: Tensor, inputs: LossInputs, level: ImportanceSamplingLevel) -> Tensor:
    """Per token (``token``), per sequence (``sequence``, GSPO), or their arithmetic or geometric mean."""
    if level == "token":
        return torch.exp(log_ratio)
    sequence_log_ratio = _sequence_log_ratio(log_ratio, inputs)
    if level == "sequence":
        return torch.exp(sequence_log_ratio)
    if level == "average":
        return (torch.exp(log_ratio) + torch.exp(sequence_log_ratio)) / 2
    if level == "geometric_average":
        return torch.exp((log_ratio + sequence_log_ratio) / 2)
    raise ValueError(f"unknown importance_sampling_level {level!r}")


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
    low, high = objective.bounds
    clipped_ratio = ratio.clamp(low, high)
    unclipped_obj = ratio * advantages  # (B, T)
    clipped_obj = clipped_ratio * advantages  # (B, T)
    per_token_loss = -torch.minimum(unclipped_obj, clipped_obj)
    # Clipped where the clipped term is the one min() picks, i.e. the gradient is cut.
    clipped = (clipped_obj < unclipped_obj).detach()
    return per_token_loss, clipped


def _cispo(ratio: Tensor, advantages: Tensor, per_token_logps: Tensor, objective: CISPO) -> tuple[Tensor, Tensor]:
    """CISPO (arXiv:2506.13585, eq. 4): REINFORCE weighted by the clipped, detached ratio."""
    low, high = objective.bounds
    weight = ratio.clamp(low, high).detach()  # (B, T)
    per_token_loss = -weight * advantages * per_token_logps
    clipped = ((ratio > high) | (ratio < low)).detach()
    return per_token_loss, clipped


def k3_kl(per_token_logps: Tensor, ref_per_token_logps: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token (Schulman 2020, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html): ``exp(d) - d - 1`` with
    ``d = log pi_ref - log pi``; unbiased, always >= 0."""
    delta = ref_per_token_logps - per_token_logps  # (B, T)
    return torch.exp(delta) - delta - 1.0
