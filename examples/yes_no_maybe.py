"""Teach a small chat model to prefer answering "yes".

The prompt asks for yes, no or maybe; the reward is 1.0 for "yes", 0.5 for
"no", 0.25 for "maybe" and 0 for anything else. Group-relative advantages
push the model toward the best answer it already sometimes gives, so a 135M
model learns it in a few steps: the smallest complete RL loop on trainq.

    python examples/yes_no_maybe.py                 # the embedded default, local stack
    python examples/yes_no_maybe.py --steps 5 --base-model /path/to/model
    python examples/yes_no_maybe.py --serial        # wait for each step before sampling the next

Each step's rollouts are sampled while the step before it trains
(``producer.pipeline.train_pipelined``, groups at most one step old).

Run it through ``trainq demo`` for a table of reward by step at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from producer import Choice, TrainableModel, Trajectory, TrajectoryGroup
from producer.backend import Backend
from producer.base_models import EMBEDDED_DEFAULT
from producer.gather import gather_trajectory_groups
from producer.pipeline import train_pipelined

if TYPE_CHECKING:
    from openai import AsyncOpenAI

REWARDS = {"yes": 1.0, "no": 0.5, "maybe": 0.25}

SYSTEM_PROMPT = "You answer with exactly one word: yes, no, or maybe."
# Two worked examples make a 135M model answer in one word most of the time
# (about 90% instead of 15%); neither shows "yes", so what to answer is left to RL.
FEW_SHOT = [
    {"role": "user", "content": "Is water wet? Respond with yes, no, or maybe."},
    {"role": "assistant", "content": "no"},
    {"role": "user", "content": "Will it snow in July? Answer only maybe, no or yes."},
    {"role": "assistant", "content": "maybe"},
]


def build_prompts() -> list[str]:
    """Every order of the three options, phrased a few ways: the model must learn the answer, not a position."""
    phrasings = [
        "Respond with {a}, {b}, or {c}.",
        "Answer only {a}, {b} or {c}.",
        "Reply with one word: {a}, {b}, or {c}.",
        "Pick one: {a}, {b}, {c}.",
    ]
    return [
        phrasing.format(a=a, b=b, c=c)
        for phrasing in phrasings
        for a, b, c in itertools.permutations(["yes", "no", "maybe"])
    ]


def reward_for(text: str | None) -> float:
    """1.0 / 0.5 / 0.25 for yes / no / maybe, ignoring case and punctuation; 0 for anything else."""
    answer = (text or "").strip().lower().strip(" .!?\"'`*")
    return REWARDS.get(answer, 0.0)


async def rollout(
    client: AsyncOpenAI, model: TrainableModel, prompt: str, *, max_tokens: int, temperature: float
) -> Trajectory:
    """Ask once; the sampled choice (token ids and logprobs) goes into the trajectory verbatim."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, *FEW_SHOT, {"role": "user", "content": prompt}]
    completion = await client.chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=temperature,
    )
    choice = Choice.from_openai(completion)
    reward = reward_for(choice.message.content)
    return Trajectory(
        [*messages, choice],
        reward=reward,
        metrics={"answered_yes": float(reward == 1.0), "valid_answer": float(reward > 0)},
    )


@dataclass
class Config:
    steps: int = 15
    groups_per_step: int = 4
    group_size: int = 8
    # LoRA r=8 on a 135M model: 1e-3 reaches reward 1.0 in 2-3 steps here; 2e-4 gains ~0.015 a step.
    learning_rate: float = 1e-3
    max_tokens: int = 3
    temperature: float = 1.0
    project: str = "yes-no-maybe"
    name: str = "agent-001"
    base_model: str = EMBEDDED_DEFAULT
    seed: int = 0
    # Sample step n+1 while step n trains (groups at most one step old); --serial waits for each step.
    serial: bool = False


@dataclass
class StepRecord:
    step: int
    sampled_at: int
    reward: float
    loss: float | None
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


async def main(backend: Backend, config: Config | None = None) -> list[StepRecord]:
    """Register, then sample, train and log ``config.steps`` times; return one record per step."""
    config = config or Config()
    rng = random.Random(config.seed)
    prompts = build_prompts()
    model = TrainableModel(config.name, config.project, base_model=config.base_model)
    await model.register(backend)
    async with model.openai_client() as client:
        return await _loop(backend, model, client, config, rng, prompts)


async def _loop(
    backend: Backend, model: TrainableModel, client: AsyncOpenAI, config: Config, rng: random.Random, prompts: list[str]
) -> list[StepRecord]:
    def sample() -> Awaitable[list[TrajectoryGroup]]:
        """One step's rollouts: ``groups_per_step`` prompts, ``group_size`` answers each."""
        return gather_trajectory_groups(
            (
                [
                    rollout(client, model, prompt, max_tokens=config.max_tokens, temperature=config.temperature)
                    for _ in range(config.group_size)
                ]
                for prompt in rng.sample(prompts, config.groups_per_step)
            ),
            pbar_desc=f"sample @{model.get_inference_name()}",
        )

    records: list[StepRecord] = []
    started = time.monotonic()
    async for step in train_pipelined(backend, model, sample, steps=config.steps,
                                      max_staleness=0 if config.serial else 1, learning_rate=config.learning_rate):
        result = step.result
        logged = await model.log(step.groups, metrics=result.metrics, step=result.step, split="train")
        now = time.monotonic()
        records.append(
            StepRecord(
                step=len(records),  # the n-th train call of this run
                sampled_at=step.sampled_step,  # the adapter that earned the reward (n - 1 pipelined, n serial)
                reward=logged["reward"],
                loss=result.metrics.get("loss"),
                seconds=now - started,
                extra={
                    "sample_s": step.sample_s,
                    "train_s": getattr(result, "train_s", 0.0),
                    "num_groups_trainable": result.metrics.get("num_groups_trainable", 0.0),
                },
            )
        )
        started = now
        print(
            f"step {records[-1].step:>2} (sampled @{step.sampled_step}): reward {logged['reward']:.3f}  "
            f"loss {result.metrics.get('loss', float('nan')):+.4f}  ({records[-1].seconds:.1f} s)",
            flush=True,
        )
    return records


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return Config(**vars(parser.parse_args(argv)))


async def _run(config: Config) -> None:
    from producer.local_backend import LocalBackend

    backend = LocalBackend()
    try:
        await main(backend, config)
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(_run(parse_args()))
