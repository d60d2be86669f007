import math

import pytest

from trainer_worker.core.advantages import STD_EPSILON, group_advantages, population_std


def test_advantages_are_centered_and_scaled_by_population_std():
    rewards = [1.0, 0.0, 0.5, 0.5]
    std = math.sqrt(((0.5**2) + (0.5**2) + 0 + 0) / 4)  # population std = 0.353553
    expected = [(r - 0.5) / (std + STD_EPSILON) for r in rewards]
    assert group_advantages(rewards) == pytest.approx(expected)
    assert population_std(rewards) == pytest.approx(std)


def test_unscaled_advantages_are_only_centered():
    assert group_advantages([3.0, 1.0], scale_rewards=False) == pytest.approx([1.0, -1.0])


def test_group_with_equal_rewards_is_not_trainable():
    assert group_advantages([0.7, 0.7, 0.7]) is None
    assert group_advantages([1.0]) is None


def test_scaled_advantages_have_unit_population_std():
    advantages = group_advantages([0.1, 0.9, 0.4, 0.3, 2.0])
    assert advantages is not None
    assert sum(advantages) == pytest.approx(0.0, abs=1e-9)
    assert population_std(advantages) == pytest.approx(1.0, rel=1e-5)
