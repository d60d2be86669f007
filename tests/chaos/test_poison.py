"""A poison job: it kills its worker's training child every time it runs (an OOM kill, say)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from producer import JobFailedError, JobStatus, QueueBackend, TrainableModel
from tests.support.groups import make_groups
from tests.support.services import start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

MAX_ATTEMPTS = 3  # the worker's default


async def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts_and_the_next_job_runs(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis()
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w")
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("poisoned", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            poison = await backend.submit_train(model, make_groups(16, n_trajectories=8, n_tokens=256))
            after = await backend.submit_train(model, make_groups(1))
            for attempt in range(1, MAX_ATTEMPTS + 1):
                deadline = time.monotonic() + 120
                while True:
                    record = await poison.record()
                    if record.status is JobStatus.RUNNING and record.attempts == attempt:
                        break
                    assert record.status is not JobStatus.SUCCEEDED, "the poison job finished: the kill came late"
                    assert time.monotonic() < deadline, f"attempt {attempt} never started: {record}"
                    await asyncio.sleep(0.02)
                child = worker.child_pid
                os.kill(child, signal.SIGKILL)  # as the OOM killer would
                worker.wait_ready(previous_child=child)

            with pytest.raises(JobFailedError, match=f"{MAX_ATTEMPTS} times") as failed:
                await poison.result(timeout=120)
            assert (await after.result(timeout=120)).step == 1, "the queue moved on"
            assert await backend.get_step(model) == 1
            record = await poison.record()
            assert record.status is JobStatus.FAILED and record.attempts == MAX_ATTEMPTS + 1
            print(f"\npoison job: {failed.value}")
    finally:
        worker.stop()
