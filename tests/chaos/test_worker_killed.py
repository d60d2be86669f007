"""The whole trainer worker (Celery main process and training child) is SIGKILLed mid-job, then started again.

Default settings throughout: recovery is bounded by the job's lease, not the visibility timeout.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from producer import JobStatus, QueueBackend, TrainableModel, keys
from tests.chaos.conftest import kill_whole_worker, saved_steps, wait_status
from tests.support.groups import make_groups
from tests.support.services import start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RESTART_BOUND_S = 90


async def test_a_job_whose_whole_worker_was_killed_completes_once_within_90s_of_the_restart(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis()
    checkpoint_root = tmp_path / "checkpoints"
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w1", checkpoint_root=checkpoint_root)
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

            restart_at = time.monotonic()
            restarted = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w2",
                                             checkpoint_root=checkpoint_root)
            ready_at = time.monotonic()
            result = await interrupted.result(timeout=RESTART_BOUND_S - (ready_at - restart_at))
            done_at = time.monotonic()
            other = await queued.result(timeout=60)

            assert (await interrupted.record()).attempts == 2, "the interrupted job ran again, once"
            assert (await queued.record()).attempts == 1
            assert (result.step, other.step) == (1, 2), "the interrupted job kept its place before the queued one"
            steps = sorted(p.name for p in (checkpoint_root / "chaos" / "killed" / "checkpoints").iterdir())
            assert steps == ["0000", "0001", "0002"], "no temporary folder left, no step doubled"
            assert await backend.get_step(model) == 2
            assert saved_steps(server.url, model) == [0, 1, 2], "one checkpoint event per step"
            print(
                f"\nwhole-worker kill, default settings: restart {ready_at - restart_at:.1f}s, "
                f"restart -> result {done_at - restart_at:.1f}s, kill -> result {done_at - killed_at:.1f}s "
                f"(rerun train_s {result.train_s:.1f}s)"
            )
    finally:
        for proc in (worker, restarted):
            if proc is not None:
                proc.stop()


async def test_a_job_running_longer_than_the_visibility_timeout_is_not_handed_out_again(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    visibility_timeout_s = 3
    server = make_redis()
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w",
                                  extra=["--visibility-timeout-s", str(visibility_timeout_s)])
    client = redis.Redis.from_url(server.url)
    queue = keys.queue_name(str(tiny_model))
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("long", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            job = await backend.submit_train(model, make_groups(48, n_trajectories=8, n_tokens=256))
            started = await wait_status(job, JobStatus.RUNNING)
            while not (await job.status()).is_terminal:
                # The message stays taken (unacknowledged), never back in the queue for a second delivery.
                assert client.llen(queue) == 0, "the running job's message was handed out again"
                assert client.hlen("unacked") == 1
                await asyncio.sleep(0.1)
            ran_s = time.monotonic() - started
            result = await job.result(timeout=5)
            assert ran_s > 2 * visibility_timeout_s, f"the job ran only {ran_s:.1f}s; make it longer"
            assert (await job.record()).attempts == 1 and result.step == 1
            assert worker.log_tail(2000).count(f"[{job.job_id}] received") == 1
            print(f"\na job of {ran_s:.1f}s under a {visibility_timeout_s}s visibility timeout was delivered once")
    finally:
        worker.stop()
        client.close()
