"""A multi-turn game: guess a secret number between 1 and 100, told "higher" or "lower" each turn.

Every assistant turn is a sampled ``Choice`` (token ids and logprobs), every
reply of the game a ``user`` message; the trainer trains on all the sampled
turns of a trajectory and masks the rest. The reward favours finding the number
in few turns and still credits getting closer, so even a small model gets a
signal:

    reward = 1.0 if found, else 0.5 * (1 - distance of the best guess / 100),
             minus 0.02 per turn used, and 0 for a turn with no number in it

    python examples/guess_number.py --steps 10            # each round plays while the step before trains
    python examples/guess_number.py --steps 10 --serial   # each round waits for the step before
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from producer import Choice, TrainableModel, Trajectory, TrajectoryGroup
from producer.backend import Backend
from producer.base_models import EMBEDDED_DEFAULT
from producer.gather import gather_trajectory_groups
from producer.pipeline import train_pipelined

if TYPE_CHECKING:
    from openai import AsyncOpenAI

RULES = (
    "Let's play a game. I am thinking of a whole number between 1 and 100. "
    "Guess it: answer with one number only. After each guess I say higher or lower."
)
SYSTEM_PROMPT = "You play a number guessing game. Reply with one whole number between 1 and 100 and nothing else."
# One worked game (binary search on a secret of 37) before the real one: without it a 135M
# model answers with a number in few games, so almost every reward is 0 and nothing is learnt.
WORKED_GAME = [
    {"role": "user", "content": RULES},
    {"role": "assistant", "content": "50"},
    {"role": "user", "content": "lower"},
    {"role": "assistant", "content": "25"},
    {"role": "user", "content": "higher"},
    {"role": "assistant", "content": "37"},
    {"role": "user", "content": "Correct, 37! New game, new number. " + RULES},
]
_NUMBER = re.compile(r"-?\d+")


@dataclass
class Config:
    steps: int = 10
    groups_per_step: int = 4
    group_size: int = 6
    max_turns: int = 6
    learning_rate: float = 2e-4
    max_tokens: int = 6
    temperature: float = 1.0
    project: str = "guess-number"
    name: str = "player-001"
    base_model: str = EMBEDDED_DEFAULT
    seed: int = 0
    serial: bool = False  # True: wait for each step before playing the next round


def parse_guess(text: str | None) -> int | None:
    """The first whole number in the answer, if any."""
    match = _NUMBER.search(text or "")
    return int(match.group()) if match else None


def score(secret: int, guesses: list[int | None]) -> float:
    """Reward of a finished game (see the module docstring)."""
    valid = [g for g in guesses if g is not None]
    if secret in valid:
        reward = 1.0
    elif valid:
        reward = 0.5 * (1 - min(abs(g - secret) for g in valid) / 100)
    else:
        reward = 0.0
    reward -= 0.02 * len(guesses)
    if any(g is None for g in guesses):
        reward = min(reward, 0.0)
    return max(reward, 0.0)


async def play(client: AsyncOpenAI, model: TrainableModel, secret: int, config: Config) -> Trajectory:
    """One game; the same secret for every game of a group, so rewards compare like for like."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}, *WORKED_GAME]
    messages_and_choices: list = list(messages)
    guesses: list[int | None] = []
    for _ in range(config.max_turns):
        completion = await client.chat.completions.create(
            model=model.get_inference_name(),
            messages=messages,  # type: ignore[arg-type]
            max_tokens=config.max_tokens,
            temperature=config.temperature,
        )
        choice = Choice.from_openai(completion)
        messages_and_choices.append(choice)
        messages.append({"role": "assistant", "content": choice.message.content or ""})
        guess = parse_guess(choice.message.content)
        guesses.append(guess)
        if guess is None or guess == secret:
            break
        reply = "higher" if guess < secret else "lower"
        messages_and_choices.append({"role": "user", "content": reply})
        messages.append({"role": "user", "content": reply})
    found = secret in guesses
    return Trajectory(
        messages_and_choices,
        reward=score(secret, guesses),
        metrics={"found": float(found), "turns": float(len(guesses))},
        metadata={"secret": secret},
    )


async def main(backend: Backend, config: Config | None = None) -> None:
    config = config or Config()
    rng = random.Random(config.seed)
    model = TrainableModel(config.name, config.project, base_model=config.base_model)
    await model.register(backend)
    client = model.openai_client()

    def sample() -> Awaitable[list[TrajectoryGroup]]:
        """One step's games: a group of games per secret, the same secret within a group."""
        secrets = [rng.randint(1, 100) for _ in range(config.groups_per_step)]
        return gather_trajectory_groups(
            ([play(client, model, secret, config) for _ in range(config.group_size)] for secret in secrets),
            pbar_desc=f"play @{model.get_inference_name()}",
            max_exceptions=0.1,
        )

    async for step in train_pipelined(backend, model, sample, steps=config.steps,
                                      max_staleness=0 if config.serial else 1, learning_rate=config.learning_rate):
        result = step.result
        logged = await model.log(step.groups, metrics=result.metrics, step=result.step, split="train")
        print(f"step {result.step} (sampled at {step.sampled_step}): reward {logged['reward']:.3f}, "
              f"found {logged.get('found', 0):.2f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field, value in vars(Config()).items():
        flag = f"--{field.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    config = Config(**vars(parser.parse_args()))

    async def run() -> None:
        from producer.local_backend import LocalBackend

        backend = LocalBackend()
        try:
            await main(backend, config)
        finally:
            await backend.close()

    asyncio.run(run())
