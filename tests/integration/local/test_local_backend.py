"""LocalBackend end to end: it starts the real stack, trains through the queue, serves each step, stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from producer import Choice, TrainableModel, Trajectory, TrajectoryGroup
from producer.local_backend import LocalBackend, read_stack

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def sample(client: AsyncOpenAI, model: TrainableModel, content: str) -> Trajectory:
    messages = [{"role": "user", "content": content}]
    completion = await client.chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=1.0,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    choice = Choice.from_openai(completion)
    return Trajectory([*messages, choice], reward=float(len(choice.token_ids)))


async def test_local_stack_trains_through_the_queue_and_stops_what_it_started(
    tiny_model: Path, tmp_path: Path
) -> None:
    path = tmp_path / "stack"
    backend = LocalBackend(str(path), inference_args=["--kv-cache-gib", "1", "--max-model-len", "512"])
    model = TrainableModel("agent", "local-test", base_model=str(tiny_model))
    try:
        await model.register(backend)
        stack = read_stack(path)
        assert stack is not None and backend.owns_stack
        assert set(stack.pids) == {"redis", "trainer", "inference"}
        assert model.get_inference_name() == "agent@0"

        # A second backend on the same path reuses the running stack and owns none of it.
        reuser = LocalBackend(str(path))
        other = TrainableModel("agent", "local-test", base_model=str(tiny_model))
        await other.register(reuser)
        assert not reuser.owns_stack and reuser.stack == stack
        await reuser.close()
        assert all(alive(pid) for pid in stack.pids.values())

        client = model.openai_client()
        groups = [
            TrajectoryGroup([await sample(client, model, f"say {word}") for _ in range(3)]) for word in ("yes", "no")
        ]
        result = await backend.train(model, groups, learning_rate=1e-3)
        assert result.step == 1 and result.job_id
        assert "loss" in result.metrics
        # The new step is served as soon as train returns.
        again = await sample(client, model, "say yes")
        assert again.choices()[0].sampled_step == 1
        await client.close()
        await model.log(groups, metrics=result.metrics, step=result.step, split="train")
        assert (path / "local-test" / "models" / "agent" / "history.jsonl").exists()
    finally:
        await backend.close()

    assert not any(alive(pid) for pid in stack.pids.values())
    assert read_stack(path) is None
