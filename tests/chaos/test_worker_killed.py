"""The whole trainer worker (Celery main process and training child) is SIGKILLed mid-job, then started again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from producer import JobStatus, QueueBackend, TrainableModel
from tests.chaos.conftest import kill_whole_worker
from tests.support.groups import make_groups
from tests.support.services import start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

VISIBILITY_TIMEOUT_S = 8


async def wait_status(job, status: JobStatus, timeout: float = 120.0) -> float:  # noqa: ANN001
    """Poll until the job has ``status``; the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while (await job.status()) is not status:
        assert time.monotonic() < deadline, f"job never reached {status}"
        await asyncio.sleep(0.05)
    return time.monotonic()


async def test_a_job_whose_whole_worker_was_killed_completes_once_after_a_restart(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis()
    checkpoint_root = tmp_path / "checkpoints"
    worker_args = ["--visibility-timeout-s", str(VISIBILITY_TIMEOUT_S)]
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w1", extra=worker_args,
                                  checkpoint_root=checkpoint_root)
    restarted = None
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("killed", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            # Big enough (32k tokens) that the step takes seconds on the tiny model, so the kill lands mid-job.
            interrupted = await backend.submit_train(model, make_groups(16, n_trajectories=8, n_tokens=256))
            queued = await backend.submit_train(model, make_groups(1))
            await wait_status(interrupted, JobStatus.RUNNING)
            await asyncio.sleep(0.2)

            killed_at = time.monotonic()
            kill_whole_worker(worker.proc.pid, worker.child_pid)
            worker.proc.wait(timeout=10)
            assert await interrupted.status() is JobStatus.RUNNING
            assert redis.Redis.from_url(server.url).hlen("unacked") == 1, "the job's message waits, unacknowledged"

            restarted = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w2", extra=worker_args,
                                             checkpoint_root=checkpoint_root)
            ready_at = time.monotonic()
            while (await interrupted.record()).attempts < 2:
                assert time.monotonic() - killed_at < 120, "the interrupted job was never handed out again"
                await asyncio.sleep(0.05)
            redelivered_at = time.monotonic()
            result = await interrupted.result(timeout=180)
            done_at = time.monotonic()
            other = await queued.result(timeout=120)

            record = await interrupted.record()
            assert record.attempts == 2, "the interrupted job ran again, once"
            assert (await queued.record()).attempts == 1
            assert sorted([result.step, other.step]) == [1, 2], "one step each, none lost, none doubled"
            steps = sorted(p.name for p in (checkpoint_root / "chaos" / "killed" / "checkpoints").iterdir())
            assert steps == ["0000", "0001", "0002"], "no temporary folder left, no step doubled"
            assert await backend.get_step(model) == 2

            recovery_s = done_at - killed_at
            print(
                f"\nwhole-worker kill, visibility_timeout={VISIBILITY_TIMEOUT_S}s: restart {ready_at - killed_at:.1f}s, "
                f"kill -> running again {redelivered_at - killed_at:.1f}s, kill -> result {recovery_s:.1f}s "
                f"(rerun train_s {result.train_s:.1f}s); "
                f"interrupted job made step {result.step}, the one queued behind it step {other.step}"
            )
            # Bounded: the restart, the visibility timeout and one sweep, then the job's own run.
            assert recovery_s < (ready_at - killed_at) + VISIBILITY_TIMEOUT_S + 10 + result.train_s + 30
    finally:
        for proc in (worker, restarted):
            if proc is not None:
                proc.stop()
