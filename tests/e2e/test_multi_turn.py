"""A multi-turn rollout on the real stack: every assistant turn sampled by vLLM, all of them trained.

The game's rules don't matter here (examples/guess_number.py plays a real one
on SmolLM2; its scoring is unit-tested): the tiny model's turns are random
tokens. What is checked is the plumbing a multi-turn agent relies on: turns
sampled with the earlier turns in the prompt, choices and environment
messages interleaved in one trajectory, every sampled token trained, the
next step served.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from producer import Choice, TrainableModel, Trajectory, TrajectoryGroup
from tests.e2e.conftest import register_and_serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(300)]

TURNS = 3


async def play(client: openai.AsyncOpenAI, model: TrainableModel, reward: float) -> Trajectory:
    """Three sampled turns, each answered by the environment, as a tool-calling or game agent runs."""
    messages: list[dict] = [{"role": "user", "content": "Guess my number between 1 and 100."}]
    items: list[dict | Choice] = list(messages)
    for turn in range(TURNS):
        completion = await client.chat.completions.create(
            model=model.get_inference_name(),
            messages=messages,
            max_tokens=4,
            temperature=1.0,
            logprobs=True,
            extra_body={"return_tokens_as_token_ids": True},
        )
        choice = Choice.from_openai(completion)
        reply = {"role": "user", "content": "higher" if turn % 2 == 0 else "lower"}
        items += [choice, reply]
        messages += [{"role": "assistant", "content": choice.message.content or ""}, reply]
    return Trajectory(items, reward=reward)


async def test_every_sampled_turn_of_a_multi_turn_rollout_is_trained(backend, inference, tiny_model):
    model = TrainableModel("player", "e2e-multi-turn", base_model=str(tiny_model))
    await register_and_serve(model, backend, inference)

    async with model.openai_client(max_retries=0) as client:
        # Rewards differ within each group, so every trajectory carries an advantage.
        groups = [
            TrajectoryGroup(await asyncio.gather(*(play(client, model, float(r)) for r in range(3))))
            for _ in range(2)
        ]
        result = await backend.train(model, groups, learning_rate=1e-2, timeout=120)
        await inference.wait_models({"player@1"}, timeout=60)
        after = await client.chat.completions.create(
            model="player@1", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )

    choices = [c for g in groups for t in g.trajectories for c in t.choices()]
    assert len(choices) == 2 * 3 * TURNS
    assert all(c.sampled_step == 0 for c in choices)
    assert result.step == 1
    assert result.metrics["num_trajectories"] == 6
    assert result.metrics["num_tokens"] == sum(len(c.token_ids) for c in choices)
    assert after.model == "player@1"
