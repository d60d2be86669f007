"""Trajectory groups -> the sequences a step trains on, and the group-level metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from producer.types import TrainConfig, Trajectory, TrajectoryGroup
from trainer_worker.core.advantages import balanced_advantage, group_advantages, population_std
from trainer_worker.core.packing import TrainSequence
from trainer_worker.core.tokenize import TokenizedTrajectory

__all__ = ["PreparedBatch", "prepare_batch"]

Tokenizer = Callable[[Trajectory], list[TokenizedTrajectory]]


@dataclass(frozen=True)
class PreparedBatch:
    sequences: list[TrainSequence]
    metrics: dict[str, float]


def prepare_batch(
    groups: list[TrajectoryGroup], latest_step: int, config: TrainConfig, tokenize: Tokenizer
) -> PreparedBatch:
    """Drop stale groups, compute advantages, tokenize the trainable trajectories.

    Staleness of a group is ``latest_step - sampled_step`` (0 when the sampled
    step is unknown, or lies in the future). Rewards metrics cover every
    submitted group, stale or not: they describe the rollouts, not the update.
    Tokenization errors are re-raised as ``ValueError`` naming the trajectory.
    A trajectory may train as several sequences (see ``tokenize``); each
    carries the trajectory's advantage.
    """
    sequences: list[TrainSequence] = []
    staleness: list[int] = []
    stale = trainable = trained_trajectories = rendered = split = 0
    for g, group in enumerate(groups):
        sampled = group.effective_sampled_step()
        age = max(latest_step - sampled, 0) if sampled is not None else 0
        staleness.append(age)
        if config.max_staleness is not None and age > config.max_staleness:
            stale += 1
            continue
        advantages = group_advantages([t.reward for t in group.trajectories], scale_rewards=config.scale_rewards)
        if advantages is None:
            continue
        trainable += 1
        trained_trajectories += len(group.trajectories)
        for t, (trajectory, advantage) in enumerate(zip(group.trajectories, advantages, strict=True)):
            try:
                pieces = tokenize(trajectory)
            except ValueError as exc:
                raise ValueError(f"groups[{g}].trajectories[{t}].{exc}") from exc
            rendered += not all(piece.sampler_context for piece in pieces)
            split += len(pieces) > 1
            weighted = balanced_advantage(advantage, config.advantage_balance)
            sequences.extend(TrainSequence(tokens=piece, advantage=weighted) for piece in pieces)

    rewards = [t.reward for group in groups for t in group.trajectories]
    metrics = {
        "num_groups_submitted": float(len(groups)),
        "num_groups_stale_dropped": float(stale),
        "num_groups_trainable": float(trainable),
        "num_trajectories": float(trained_trajectories),
        "num_trajectories_submitted": float(len(rewards)),
        "num_trajectories_rendered": float(rendered),
        "num_trajectories_split": float(split),
        "mismatch_context_fraction": _unverified_context_fraction(sequences),
        "num_exceptions": float(sum(len(group.exceptions) for group in groups)),
        "staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
        "staleness_max": float(max(staleness, default=0)),
        "reward": sum(rewards) / len(rewards) if rewards else 0.0,
        "reward_std_dev": (
            sum(population_std([t.reward for t in group.trajectories]) for group in groups) / len(groups)
            if groups
            else 0.0
        ),
    }
    return PreparedBatch(sequences=sequences, metrics=metrics)


def _unverified_context_fraction(sequences: list[TrainSequence]) -> float:
    """Share of trained tokens whose context is not known to be the sampler's (rendered, not its prompt ids)."""
    trained = sum(s.tokens.num_trained_tokens for s in sequences)
    rendered = sum(s.tokens.num_trained_tokens for s in sequences if not s.tokens.sampler_context)
    return rendered / trained if trained else 0.0
