"""The worker's training child is SIGKILLed in the middle of a job."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from producer import JobStatus, QueueBackend, TrainableModel
from tests.support.groups import make_groups
from tests.support.services import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


async def _wait_running(job, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while await job.status() is not JobStatus.RUNNING:
        assert asyncio.get_running_loop().time() < deadline, "job never started"
        await asyncio.sleep(0.02)


async def test_killed_child_mid_job_completes_once_and_next_job_gets_next_step(
    backend: QueueBackend, model: TrainableModel, worker: WorkerProcess
) -> None:
    # Big enough that the step takes a few seconds on the tiny model, so the kill lands mid-job.
    job = await backend.submit_train(model, make_groups(16, n_trajectories=8, n_tokens=256))
    await _wait_running(job)
    await asyncio.sleep(0.3)
    victim = worker.child_pid
    os.kill(victim, signal.SIGKILL)

    result = await job.result(timeout=180)
    record = await job.record()
    assert record.attempts == 2, "the kill should have landed while the job ran, forcing a redelivery"
    assert result.step == 1
    assert worker.wait_ready(previous_child=victim) != victim

    checkpoints = sorted((worker.checkpoint_root / model.project / model.name / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["0000", "0001"]
    assert not any(p.name.startswith(".") for p in checkpoints[0].parent.iterdir()), "temporary folder left"

    nxt = await backend.train(model, make_groups(1), timeout=120)
    assert nxt.step == 2
