"""Group-relative advantages (GRPO, Shao et al. 2024, arXiv:2402.03300, section 4.1.2).

Each trajectory is compared with the others sampled for the same prompt:
``A_i = r_i - mean(r)``, divided by ``std(r) + 1e-6`` when ``scale_rewards``
(population std, as the group is the whole population being compared). Dr. GRPO
(Liu et al. 2025, arXiv:2503.20783) argues for leaving the std out, hence the switch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["STD_EPSILON", "balanced_advantage", "group_advantages", "population_std"]

STD_EPSILON = 1e-6


def population_std(values: Sequence[float]) -> float:
    """Standard deviation with denominator ``n`` (0.0 for an empty sequence)."""
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def group_advantages(rewards: Sequence[float], *, scale_rewards: bool = True) -> list[float] | None:
    """Advantages of one group's trajectories, or ``None`` if the group cannot be trained.

    A group whose rewards are all equal (including a group of one) has no signal:
    every advantage would be zero, so it is reported as not trainable rather
    than spending a forward pass on it.
    """
    if len(rewards) < 2 or max(rewards) == min(rewards):
        return None
    mean = sum(rewards) / len(rewards)
    centered = [r - mean for r in rewards]
    if not scale_rewards:
        return centered
    scale = population_std(rewards) + STD_EPSILON
    return [c / scale for c in centered]


def balanced_advantage(advantage: float, balance: float) -> float:
    """``advantage`` weighed by ``1 + balance`` if positive, ``1 - balance`` if negative (ART's ``advantage_balance``).

    ``balance`` in [-1, 1]: 0 leaves every advantage as it is, 1 trains on the
    better-than-average trajectories only, -1 on the worse ones only.
    """
    return advantage * (1.0 + balance if advantage > 0 else 1.0 - balance)
