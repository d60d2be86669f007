"""The inference worker is killed while training goes on, and started again: it catches up from the stream."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import openai
import pytest

from producer import QueueBackend, TrainableModel
from producer.types import Choice
from tests.chaos.conftest import wait_gone
from tests.integration.inference.worker import API_KEY, InferenceWorker
from tests.support.groups import make_group, make_groups
from tests.support.services import start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(600)]


async def test_a_restarted_inference_worker_serves_every_step_trained_while_it_was_down(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis()
    checkpoint_root = tmp_path / "checkpoints"

    def inference_worker(n: int) -> InferenceWorker:
        return InferenceWorker(redis_url=server.url, base_model=tiny_model, checkpoint_root=checkpoint_root,
                               log_path=tmp_path / f"inference-{n}.log")

    first = inference_worker(1)  # vLLM starts while the trainer does
    trainer = start_trainer_worker(server.url, str(tiny_model), tmp_path / "trainer", checkpoint_root=checkpoint_root)
    second = None
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("followed", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            await backend.train(model, [make_group()], timeout=120)
            await first.wait_models({"followed@0", "followed@1"}, timeout=180)

            # Kill the worker and its vLLM while a step is being trained; two more steps land while it is down.
            running = asyncio.create_task(backend.train(model, make_groups(2, n_trajectories=4, n_tokens=96)))
            await asyncio.sleep(0.5)
            vllm = first.vllm_pid()
            os.kill(first.proc.pid, signal.SIGKILL)
            if vllm:  # vLLM's whole process group: its engine processes too, as a machine's crash would take them
                os.killpg(vllm, signal.SIGKILL)
            for pid in (first.proc.pid, vllm):
                if pid:
                    wait_gone(pid)
            first.proc.wait(timeout=10)
            await first.http.aclose()
            assert (await running).step == 2
            assert (await backend.train(model, [make_group(seed=3)], timeout=120)).step == 3

            second = inference_worker(2)
            started = time.monotonic()
            wanted = {f"followed@{step}" for step in range(4)}
            await second.wait_models(wanted, timeout=240)
            caught_up_s = time.monotonic() - started
            async with openai.AsyncOpenAI(base_url=f"{second.base_url}/v1", api_key=API_KEY, max_retries=0) as client:
                completion = await client.chat.completions.create(
                    model="followed@3", messages=[{"role": "user", "content": "yes or no?"}], max_tokens=2,
                    temperature=0.0, logprobs=True, extra_body={"return_tokens_as_token_ids": True},
                )
            assert Choice.from_openai(completion).sampled_step == 3
            print(f"\nrestarted inference worker served steps 0-3 {caught_up_s:.1f}s after its start (vLLM start included)")
    finally:
        trainer.stop()
        for worker in (first, second):
            if worker is not None:
                await worker.aclose()
