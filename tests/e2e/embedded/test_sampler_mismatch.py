"""The trainer scores what the sampler saw and produced: measured on the real stack, first job of a fresh model.

The inference worker's vLLM samples in float32 on the CPU, as the trainer
trains; the trainer scores each turn on the sampler's own prompt and sampled
token ids, at the temperature it was sampled at. The job's metrics compare its
log-probabilities with the sampler's before the update: they must agree to
the precision of the two kernels, for single-turn, multi-turn and
tool-calling conversations, at T=1 and T=0.7, and every trained token must
sit in the sampler's own context.
"""

from __future__ import annotations

import asyncio
import json

import pytest

import producer.art as art
from producer.art.local import LocalBackend
from producer.base_models import EMBEDDED_DEFAULT

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(600)]

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up the secret code of a door.",
        "parameters": {"type": "object", "properties": {"door": {"type": "integer"}}, "required": ["door"]},
    },
}


def worked_lookup(door: int, code: int, index: int) -> art.Messages:
    """One worked exchange: two of them make the 135M model call the tool by itself most of the time."""
    call_id = f"call-{index}"
    return [
        {"role": "user", "content": f"What is the code of door {door}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"door": door})}}]},
        {"role": "tool", "tool_call_id": call_id, "content": str(code)},
        {"role": "assistant", "content": f"The code of door {door} is {code}."},
    ]


async def sample(model: art.TrainableModel, trajectory: art.Trajectory, temperature: float) -> object:
    completion = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=trajectory.messages(), tools=trajectory.tools,
        max_tokens=48, temperature=temperature,
    )
    choice = completion.choices[0]
    trajectory.messages_and_choices.append(choice)
    return choice


async def single_turn(model: art.TrainableModel, temperature: float, reward: float) -> art.Trajectory:
    trajectory = art.Trajectory([{"role": "user", "content": "Is the sky blue? Answer yes, no or maybe."}],
                                reward=reward)
    await sample(model, trajectory, temperature)
    return trajectory


async def three_turns(model: art.TrainableModel, temperature: float, reward: float) -> art.Trajectory:
    trajectory = art.Trajectory([{"role": "user", "content": "Guess my number between 1 and 100."}], reward=reward)
    for reply in ("higher", "lower", None):
        await sample(model, trajectory, temperature)
        if reply:
            trajectory.messages_and_choices.append({"role": "user", "content": reply})
    return trajectory


async def three_turns_with_tools(model: art.TrainableModel, temperature: float, reward: float) -> art.Trajectory:
    trajectory = art.Trajectory(
        [{"role": "system", "content": "You find door codes. Always call the lookup tool first, then give the code."},
         *worked_lookup(12, 4821, 0), *worked_lookup(7, 1930, 1),
         {"role": "user", "content": "What is the code of door 40?"}],
        tools=[LOOKUP], reward=reward,
    )
    for follow_up in ("And the code of door 41?", None, None):
        choice = await sample(model, trajectory, temperature)
        for call in choice.message.tool_calls or []:  # type: ignore[attr-defined]
            trajectory.messages_and_choices.append({"role": "tool", "tool_call_id": call.id, "content": "5577"})
        if follow_up and not choice.message.tool_calls:  # type: ignore[attr-defined]
            trajectory.messages_and_choices.append({"role": "user", "content": follow_up})
    return trajectory


ROLLOUTS = {"single-turn": single_turn, "3-turn": three_turns, "3-turn-tools": three_turns_with_tools}
FIGURES: dict[tuple[str, float], dict[str, float]] = {}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", list(ROLLOUTS))
async def test_the_first_job_scores_the_samplers_tokens_as_the_sampler_did(stack_path: str, kind: str,
                                                                            temperature: float) -> None:
    backend = LocalBackend(path=stack_path)
    model = art.TrainableModel(name=f"mismatch-{kind}-{temperature}", project="mismatch", base_model=EMBEDDED_DEFAULT)
    try:
        await model.register(backend)
        rollout = ROLLOUTS[kind]
        groups = [
            art.TrajectoryGroup(await asyncio.gather(*(rollout(model, temperature, float(r)) for r in range(3))))
            for _ in range(2)
        ]
        result = await backend.train(model, groups, learning_rate=1e-5)
    finally:
        await backend.close()
    metrics = result.metrics
    FIGURES[kind, temperature] = metrics
    print(f"\n{kind} T={temperature}: tokens {metrics['num_tokens']:.0f}, split {metrics['num_trajectories_split']:.0f}, "
          f"ratio mean {metrics['mismatch_ratio_mean']:.4f} max {metrics['mismatch_ratio_max']:.3f}, "
          f"k3 {metrics['mismatch_kl_k3']:.2e}, |dlogp| {metrics['mismatch_logprob_abs_diff']:.4f}, "
          f"foreign context {metrics['mismatch_context_fraction']:.2f}")
    if kind == "3-turn-tools":
        assert any(c.message.tool_calls for g in groups for t in g for c in t.choices()), "no tool call was sampled"
    assert metrics["num_tokens"] > 0 and metrics["num_trajectories_rendered"] == 0
    assert metrics["mismatch_context_fraction"] == 0.0
    assert 0.98 <= metrics["mismatch_ratio_mean"] <= 1.02
    assert metrics["mismatch_kl_k3"] < 1e-3
