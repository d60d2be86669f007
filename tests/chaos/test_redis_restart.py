"""Redis (AOF on, password set, as in production) restarts while jobs are queued and one is running."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from producer import (
    BackendUnavailableError,
    JobStatus,
    QueueBackend,
    TrainableModel,
    TrainqError,
    TrainTimeoutError,
    keys,
)
from tests.support.groups import make_group, make_groups
from tests.support.services import start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

PASSWORD = "s3cret-pw"
VISIBILITY_TIMEOUT_S = 10
DOWN_S = 3.0
OUTAGE_S = 10.0  # the job runs ~5 s, then the worker retries its record for 2 s


async def test_jobs_queued_and_running_across_a_redis_restart_each_complete_once(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis(password=PASSWORD, appendonly=True)
    assert server.url.startswith(f"redis://:{PASSWORD}@")
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w",
                                  extra=["--visibility-timeout-s", str(VISIBILITY_TIMEOUT_S)])
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("restarted", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            first_child = worker.child_pid

            # Callers block in backend.train: one job runs (a few seconds), two wait in the queue.
            callers = [
                asyncio.create_task(backend.train(model, make_groups(8, n_trajectories=8, n_tokens=256))),
                asyncio.create_task(backend.train(model, [make_group(seed=1)])),
                asyncio.create_task(backend.train(model, [make_group(seed=2)])),
            ]
            while not await _any_running(backend, worker):
                await asyncio.sleep(0.05)

            server.stop()
            restarted_at = time.monotonic()
            # While Redis is down, a new submission fails fast with the retryable error, never hangs.
            with pytest.raises(BackendUnavailableError):
                await asyncio.wait_for(backend.submit_train(model, make_groups(1)), timeout=30)
            await asyncio.sleep(max(0.0, DOWN_S - (time.monotonic() - restarted_at)))
            server.start()
            back_at = time.monotonic()

            try:
                results = await asyncio.wait_for(asyncio.gather(*callers), timeout=180)
            except TimeoutError:
                pytest.fail(f"callers still waiting 180 s after Redis came back; worker log:\n{worker.log_tail(80)}")
            all_done_at = time.monotonic()
            assert sorted(r.step for r in results) == [1, 2, 3], "every job made exactly one step"
            for result in results:
                record = await backend.job(result.job_id).record()
                assert record.status is JobStatus.SUCCEEDED
                assert record.attempts == 1, f"job {result.job_id} ran {record.attempts} times"

            # The worker reconnected by itself (same child: nothing crashed), and takes new jobs.
            after = await backend.train(model, [make_group(seed=3)], timeout=120)
            assert after.step == 4
            assert worker.child_pid == first_child and worker.proc.poll() is None

            # A message whose ack was lost with the connection comes back after the visibility
            # timeout; the job record says it already succeeded, so it makes no second step.
            await asyncio.sleep(VISIBILITY_TIMEOUT_S + 5 - (time.monotonic() - back_at))
            assert await backend.get_step(model) == 4
            duplicates = worker.log_tail(2000).count("already succeeded; skipping")
            print(
                f"\nRedis down {back_at - restarted_at:.1f}s (SIGTERM, AOF, password): every caller got its result "
                f"{all_done_at - back_at:.1f}s after Redis came back; redelivered-and-skipped duplicates: {duplicates}"
            )
    finally:
        worker.stop()


async def test_redis_down_longer_than_the_workers_retry_window_leaves_no_job_running(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    """The worker gives up writing a finished job's record; the job is redelivered and finished from its step."""
    retry_s = 2.0
    server = make_redis(password=PASSWORD, appendonly=True)
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w",
                                  extra=["--redis-retry-s", str(retry_s)])
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("outage", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            callers = [
                asyncio.create_task(backend.train(model, make_groups(8, n_trajectories=8, n_tokens=256))),
                asyncio.create_task(backend.train(model, [make_group(seed=1)])),
            ]
            while not await _any_running(backend, worker):
                await asyncio.sleep(0.05)
            server.stop()
            # Down for longer than the running job's remaining seconds plus the worker's retry window.
            await asyncio.sleep(OUTAGE_S)
            server.start()
            back_at = time.monotonic()
            try:
                outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), timeout=120)
            except TimeoutError:
                pytest.fail(f"callers still waiting 120 s after Redis came back; worker log:\n{worker.log_tail(80)}")
            done_s = time.monotonic() - back_at
            for outcome in outcomes:
                assert not isinstance(outcome, BaseException) or isinstance(outcome, TrainqError), repr(outcome)
            assert sorted(o.step for o in outcomes if not isinstance(o, BaseException)) == [1, 2]

            client = aioredis.Redis.from_url(server.url)
            try:
                queue = keys.queue_name(worker.base_model)
                statuses = [await backend.job(job_id.decode()).status()
                            for job_id in await client.zrange(keys.queue_jobs_key(queue), 0, -1)]
            finally:
                await client.aclose()
            assert JobStatus.RUNNING not in statuses and JobStatus.QUEUED not in statuses, statuses
            assert await backend.get_step(model) == 2
            assert "Redis unreachable" in worker.log_tail(4000)
            print(f"\nRedis down {OUTAGE_S:.0f} s, worker retry window {retry_s:.0f} s: every caller got its result "
                  f"{done_s:.1f}s after Redis came back; no job left running")
    finally:
        worker.stop()


async def test_a_caller_waiting_through_a_long_outage_gets_backend_unavailable_in_bounded_time(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    """Without a worker: the job stays queued, Redis goes away for longer than the caller's grace."""
    server = make_redis(password=PASSWORD, appendonly=True)
    async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
        job = await backend._submit(TrainableModel("lonely", "chaos", base_model="nobody-serves-this"), "register")
        waiting = asyncio.create_task(job.result(reconnect_grace_s=2.0))
        await asyncio.sleep(0.5)
        server.stop()
        lost_at = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="Redis is unreachable"):
            await asyncio.wait_for(waiting, timeout=30)
        gave_up_s = time.monotonic() - lost_at
        assert gave_up_s < 15, f"the caller waited {gave_up_s:.1f} s for a grace of 2 s"
        print(f"\nwith reconnect_grace_s=2 the waiting caller raised BackendUnavailableError after {gave_up_s:.1f}s")

        server.start()
        assert await job.status() is JobStatus.QUEUED, "the job itself is still there (AOF)"


async def test_a_caller_whose_timeout_runs_out_gets_train_timeout_not_backend_unavailable(
    make_redis, tmp_path: Path
) -> None:
    server = make_redis(password=PASSWORD)
    async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
        job = await backend._submit(TrainableModel("slow", "chaos", base_model="nobody-serves-this"), "register")
        with pytest.raises(TrainTimeoutError):
            await job.result(timeout=0.3)


async def test_a_wrong_password_is_a_clear_backend_unavailable_error(make_redis, tmp_path: Path) -> None:
    server = make_redis(password=PASSWORD)
    wrong = server.url.replace(PASSWORD, "wrong")
    async with QueueBackend(wrong, path=str(tmp_path / "logs")) as backend:
        model = TrainableModel("denied", "chaos", base_model="m")
        with pytest.raises(BackendUnavailableError):
            await backend.submit_train(model, make_groups(1))


async def _any_running(backend: QueueBackend, worker) -> bool:
    import redis.asyncio as aioredis

    from producer import keys

    client = aioredis.Redis.from_url(backend.redis_url)
    try:
        for job_id in await client.zrange(keys.queue_jobs_key(keys.queue_name(worker.base_model)), 0, -1):
            if await backend.job(job_id.decode()).status() is JobStatus.RUNNING:
                record = await backend.job(job_id.decode()).record()
                if record.kind == "train":
                    return True
        return False
    finally:
        await client.aclose()
