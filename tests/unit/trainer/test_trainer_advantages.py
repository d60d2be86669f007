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


@pytest.mark.parametrize(("balance", "expected"), [(0.0, (2.0, -2.0)), (1.0, (4.0, 0.0)), (-1.0, (0.0, -4.0)),
                                                   (0.5, (3.0, -1.0))])
def test_advantage_balance_weighs_positive_and_negative_advantages(balance, expected):
    from trainer_worker.core.advantages import balanced_advantage

    assert (balanced_advantage(2.0, balance), balanced_advantage(-2.0, balance)) == expected


def test_art_learning_rate_options_scale_the_step():
    from producer.types import TrainConfig
    from trainer_worker.core.trainer import effective_learning_rate

    metrics = {"reward_std_dev": 0.5, "num_trajectories": 16.0}
    assert effective_learning_rate(TrainConfig(learning_rate=1e-3), metrics) == 1e-3
    assert effective_learning_rate(TrainConfig(learning_rate=1e-3, scale_learning_rate_by_reward_std_dev=True),
                                   metrics) == pytest.approx(5e-4)
    assert effective_learning_rate(
        TrainConfig(learning_rate=1e-3, num_trajectories_learning_rate_multiplier_power=-0.5), metrics
    ) == pytest.approx(1e-3 / 4)
