"""``TrainConfig``: how one train step is run, checked on the producer before anything is queued."""

from __future__ import annotations

import math
from typing import Literal

import msgspec

__all__ = ["IMPORTANCE_SAMPLING_LEVELS", "ImportanceSamplingLevel", "TrainConfig"]

ImportanceSamplingLevel = Literal["token", "sequence", "average", "geometric_average"]
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence", "average", "geometric_average")


class TrainConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How one train step is run. Every field is a keyword of ``backend.train``.

    Values are checked at construction, on the producer, before anything is
    queued: a bad one is a ``ValueError`` naming it.
    """

    learning_rate: float = 5e-6
    """AdamW learning rate of the LoRA parameters; > 0."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the base model (adapter disabled); >= 0, 0 skips it."""
    ppo: bool = False
    """PPO clipped surrogate when true; CISPO-style clipped-weight policy gradient otherwise."""
    epsilon: float | None = None
    """Lower clip range; default 0.2 for PPO; for CISPO a lower bound of the weight (1 - epsilon) if given."""
    epsilon_high: float | None = None
    """Upper clip range; defaults to ``epsilon`` for PPO and to 0.28 for CISPO (see the README)."""
    scale_rewards: bool = True
    """Divide group-relative advantages by the group's reward std (+1e-6)."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """Importance ratio per token, per sequence (geometric mean, GSPO), or their arithmetic or geometric average."""
    max_staleness: int | None = None
    """Drop groups sampled more than this many steps before the latest; None keeps all."""
    allow_training_without_logprobs: bool = False
    """Accept choices without sampler logprobs, using the trainer's own (ratio 1)."""
    advantage_balance: float = 0.0
    """In [-1, 1]: positive advantages weigh ``1 + b``, negative ones ``1 - b`` (1 trains only on positive)."""
    max_negative_advantage_importance_sampling_weight: float | None = None
    """Cap of the importance ratio of tokens with a negative advantage; > 0."""
    mask_prob_ratio: bool = False
    """Drop the tokens whose ratio is outside the clip range from the loss, instead of clipping them."""
    truncated_importance_sampling: float | None = None
    """Weigh each token by ``min(pi_trainer / pi_sampler, value)``, detached, and take the policy
    ratio against the trainer's own log-probabilities: truncated importance sampling (Yao et al. 2025)
    against the training-inference mismatch; >= 1."""
    scale_learning_rate_by_reward_std_dev: bool = False
    """Multiply the learning rate by the step's mean within-group reward standard deviation."""
    num_trajectories_learning_rate_multiplier_power: float = 0.0
    """Multiply the learning rate by (trajectories trained) ** power; 0 leaves it as it is."""
    kimi_k2_tau: float | None = None
    """Subtract ``tau * (log pi_trainer - log pi_sampler)`` (detached) from each token's advantage (Kimi K2)."""

    def __post_init__(self) -> None:
        _check(_finite(self.learning_rate) and self.learning_rate > 0, "learning_rate", "a finite number > 0", self.learning_rate)
        _check(_finite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0", self.beta)
        for field in ("epsilon", "epsilon_high", "max_negative_advantage_importance_sampling_weight"):
            value = getattr(self, field)
            _check(value is None or (_finite(value) and value > 0), field, "None or a finite number > 0", value)
        for field in ("ppo", "scale_rewards", "allow_training_without_logprobs", "mask_prob_ratio",
                      "scale_learning_rate_by_reward_std_dev"):
            _check(isinstance(getattr(self, field), bool), field, "True or False", getattr(self, field))
        _check(self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level",
               f"one of {', '.join(map(repr, IMPORTANCE_SAMPLING_LEVELS))}", self.importance_sampling_level)
        _check(self.max_staleness is None or (_is_int(self.max_staleness) and self.max_staleness >= 0),
               "max_staleness", "None or an int >= 0", self.max_staleness)
        _check(_finite(self.advantage_balance) and -1.0 <= self.advantage_balance <= 1.0, "advantage_balance",
               "a number in [-1, 1]", self.advantage_balance)
        _check(self.truncated_importance_sampling is None
               or (_finite(self.truncated_importance_sampling) and self.truncated_importance_sampling >= 1.0),
               "truncated_importance_sampling", "None or a finite number >= 1", self.truncated_importance_sampling)
        _check(_finite(self.num_trajectories_learning_rate_multiplier_power),
               "num_trajectories_learning_rate_multiplier_power", "a finite number",
               self.num_trajectories_learning_rate_multiplier_power)
        _check(self.kimi_k2_tau is None or (_finite(self.kimi_k2_tau) and self.kimi_k2_tau >= 0), "kimi_k2_tau",
               "None or a finite number >= 0", self.kimi_k2_tau)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")
