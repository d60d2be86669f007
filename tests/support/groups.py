"""Trajectory groups for tests: real message dicts and sampled choices with plausible logprobs."""

from __future__ import annotations

import random

from producer.types import Choice, ChoiceMessage, Trajectory, TrajectoryGroup

VOCAB_LIMIT = 300  # below the tiny model's vocabulary size and its special tokens


def make_group(n_trajectories: int = 4, n_tokens: int = 8, *, seed: int = 0, rewards: list[float] | None = None,
               sampled_step: int | None = None) -> TrajectoryGroup:
    rng = random.Random(seed)
    rewards = rewards if rewards is not None else [float(i % 3) / 2 for i in range(n_trajectories)]
    trajectories = []
    for i, reward in enumerate(rewards):
        token_ids = [rng.randrange(3, VOCAB_LIMIT) for _ in range(n_tokens)]
        choice = Choice(
            token_ids=token_ids,
            logprobs=[-rng.uniform(0.5, 6.0) for _ in token_ids],
            message=ChoiceMessage(content=f"answer {i}"),
            finish_reason="stop",
        )
        messages = [
            {"role": "system", "content": "Answer with yes, no or maybe."},
            {"role": "user", "content": f"Question {seed}?"},
        ]
        trajectories.append(Trajectory([*messages, choice], reward=reward, metrics={"length": float(n_tokens)}))
    return TrajectoryGroup(trajectories, sampled_step=sampled_step)


def make_groups(n_groups: int = 2, **kwargs: object) -> list[TrajectoryGroup]:
    return [make_group(seed=g, **kwargs) for g in range(n_groups)]  # type: ignore[arg-type]
