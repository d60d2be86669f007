"""ART's own forms, through ``producer.art``, on the local stack with the embedded model.

Written as ART's backend-train test and its examples write rollouts: a raw
openai choice in the trajectory, no logprobs asked for, groups built from
coroutines, iteration over groups, ``verbose=True``, bool metrics, the
deprecated ``model.train`` with ``art.TrainConfig``; and a multi-turn agent that
calls a tool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import producer.art as art
from producer.art.local import LocalBackend
from producer.art.types import LocalTrainResult
from producer.base_models import EMBEDDED_DEFAULT
from producer.history import read_history

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(600)]

PROMPTS = ["Say yes", "Say no", "Say maybe", "Say hello"]


async def simple_rollout(client, model_name: str, prompt: str) -> art.Trajectory:  # noqa: ANN001
    messages: art.Messages = [{"role": "user", "content": prompt}]
    chat_completion = await client.chat.completions.create(
        messages=messages, model=model_name, max_tokens=6, timeout=60, temperature=1
    )
    choice = chat_completion.choices[0]
    content = (choice.message.content or "").lower()
    reward = 1.0 if "yes" in content else 0.5 if "no" in content else 0.25 if "maybe" in content else 0.0
    trajectory = art.Trajectory(messages_and_choices=[*messages, choice], reward=reward)
    trajectory.metrics["said_yes"] = "yes" in content  # ART allows bool metrics
    return trajectory


async def test_arts_yes_no_maybe_flow_trains_logs_and_the_deprecated_train_still_works(stack_path: str) -> None:
    backend = LocalBackend(path=stack_path)
    model = art.TrainableModel(name="art-flow", project="art-forms", base_model=EMBEDDED_DEFAULT)
    try:
        await model.register(backend)
        openai_client = model.openai_client()
        assert model.openai_client() is openai_client, "one client per model, however often it is asked for"
        inference_name = model.get_inference_name()
        assert inference_name == "art-flow@0"

        train_groups = await art.gather_trajectory_groups(
            [art.TrajectoryGroup([simple_rollout(openai_client, inference_name, p) for _ in range(4)]) for p in PROMPTS]
        )
        assert [len(group) for group in train_groups] == [4, 4, 4, 4]
        rewards = [[t.reward for t in group] for group in train_groups]
        assert all(r in (0.0, 0.25, 0.5, 1.0) for group in rewards for r in group)

        result = await backend.train(model, train_groups, learning_rate=1e-5, verbose=True)
        assert isinstance(result, LocalTrainResult)
        assert result.step == 1 and isinstance(result.metrics, dict)
        assert result.checkpoint_path is not None and Path(result.checkpoint_path, "adapter_config.json").exists()
        # The raw choices were trained on the sampler's own tokens: its prompt ids, its temperature.
        assert result.metrics["num_trajectories_rendered"] == 0.0

        await model.log(train_groups, metrics=result.metrics, step=result.step, split="train")
        history = read_history(Path(stack_path) / "art-forms" / "models" / "art-flow")
        assert history[-1]["step"] == 1 and 0.0 <= history[-1]["train/said_yes"] <= 1.0
        logged = Path(stack_path, "art-forms", "models", "art-flow", "trajectories", "train", "0001.jsonl")
        first = json.loads(logged.read_text().splitlines()[0])
        assert first["messages"][-1]["role"] == "assistant" and first["messages"][-1]["num_tokens"] >= 1

        more_groups = await art.gather_trajectory_groups(
            art.TrajectoryGroup(simple_rollout(openai_client, model.get_inference_name(), p) for _ in range(2))
            for p in PROMPTS[:2]
        )
        with pytest.warns(DeprecationWarning, match="backend.train"):
            await model.train(more_groups, config=art.TrainConfig(learning_rate=1e-5))
        assert await model.get_step() == 2
    finally:
        await backend.close()
    assert openai_client.is_closed(), "backend.close() closes the model's client"


ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two whole numbers.",
        "strict": True,  # vLLM then holds a call's arguments to the schema
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}


async def tool_rollout(model: art.TrainableModel, a: int, b: int) -> art.Trajectory:
    """Ask, get a tool call, answer it with a tool message, get the final answer."""
    client = model.openai_client()
    trajectory = art.Trajectory(
        messages_and_choices=[
            {"role": "system", "content": "You add numbers with the add tool."},
            {"role": "user", "content": f"What is {a} + {b}?"},
        ],
        tools=[ADD_TOOL],
    )
    call = await client.chat.completions.create(
        model=model.get_inference_name(), messages=trajectory.messages(), tools=trajectory.tools,
        tool_choice="required", max_tokens=60,
    )
    choice = call.choices[0]
    assert choice.message.tool_calls, "tool_choice='required' answers with a tool call"
    trajectory.messages_and_choices.append(choice)
    tool_call = choice.message.tool_calls[0]
    arguments = json.loads(tool_call.function.arguments)  # a 135M model's arguments: valid JSON, any shape
    total = sum(v for v in arguments.values() if isinstance(v, int)) if isinstance(arguments, dict) else 0
    trajectory.messages_and_choices.append({"role": "tool", "tool_call_id": tool_call.id, "content": str(total)})
    answer = await client.chat.completions.create(
        model=model.get_inference_name(), messages=trajectory.messages(), tools=trajectory.tools, max_tokens=8,
    )
    trajectory.messages_and_choices.append(answer.choices[0])
    trajectory.reward = float(str(a + b) in (answer.choices[0].message.content or "")) + 0.5 * (total == a + b)
    trajectory.metrics["tool_args_right"] = total == a + b
    return trajectory.finish()


async def test_a_multi_turn_agent_calls_a_tool_trains_one_step_and_samples_the_new_step(stack_path: str) -> None:
    backend = LocalBackend(path=stack_path)
    model = art.TrainableModel(name="adder", project="art-forms", base_model=EMBEDDED_DEFAULT)
    try:
        await model.register(backend)
        groups = await art.gather_trajectory_groups(
            (art.TrajectoryGroup(tool_rollout(model, a, b) for _ in range(3)) for a, b in ((2, 3), (10, 7))),
            max_exceptions=1,
        )
        for group in groups:
            for trajectory in group:
                tool_turn = trajectory.messages()[2]
                assert tool_turn["role"] == "assistant" and tool_turn["tool_calls"][0]["function"]["name"] == "add"
                assert trajectory.messages()[3]["role"] == "tool"
                assert len(trajectory.choices()) == 2 and trajectory.metrics["duration"] > 0
        result = await backend.train(model, groups, learning_rate=1e-4)
        assert result.step == 1
        assert result.metrics["mismatch_context_fraction"] == 0.0

        after = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=[{"role": "user", "content": "What is 1 + 1?"}],
            tools=[ADD_TOOL], max_tokens=8,
        )
        assert after.model == "adder@1"
    finally:
        await backend.close()
