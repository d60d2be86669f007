"""Waiting on jobs: calls that need a worker fail fast without one, and many waiting handles share one listener."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import redis

from producer import NoWorkerError, QueueBackend, TrainableModel, keys
from tests.support.groups import make_groups
from tests.support.services import WorkerProcess

pytestmark = pytest.mark.slow

HANDLES = 1000


async def test_calls_needing_a_worker_fail_within_seconds_when_none_serves_the_base_model(
    backend: QueueBackend, worker: WorkerProcess, redis_url: str, tmp_path: Path
) -> None:
    # The worker serves a local folder; this model names the same weights by a hub id.
    model = TrainableModel("unserved", "itest", base_model="org/tiny-llama")
    queue = keys.queue_name(model.base_model)
    started = time.monotonic()
    with pytest.raises(NoWorkerError) as caught:
        await asyncio.wait_for(model.register(backend), timeout=10)  # default settings
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert queue in message and worker.hostname in message and worker.base_model in message, message
    async with QueueBackend(redis_url, path=str(tmp_path / "logs"), worker_wait_s=0.5) as quick:
        for call in (quick.train(model, make_groups(1)), quick.delete_checkpoints(model, [])):
            with pytest.raises(NoWorkerError, match=queue):
                await call


async def test_waiting_on_a_job_whose_queue_has_no_live_worker_is_a_clear_error(redis_url: str, tmp_path: Path) -> None:
    async with QueueBackend(redis_url, path=str(tmp_path / "logs"), worker_grace_s=1.0) as backend:
        model = TrainableModel("orphan", "itest", base_model="org/nobody-serves-this")
        job = await backend.submit_train(model, make_groups(1))  # queued all the same
        with pytest.raises(NoWorkerError, match=keys.queue_name(model.base_model)):
            await asyncio.wait_for(job.result(), timeout=30)
        assert (await job.status()).value == "queued", "the job itself stays queued"


def _clients_of_this_process(redis_url: str) -> int:
    """Redis connections this process holds, from the server's side (CLIENT LIST), the counting one excluded."""
    client = redis.Redis.from_url(redis_url)
    try:
        port = client.connection_pool.connection_kwargs["port"]
        mine = {c.laddr.port for c in psutil.Process(os.getpid()).net_connections(kind="tcp")
                if c.raddr and c.raddr.port == port}
        own_id = client.client_id()
        return sum(1 for entry in client.client_list()
                   if int(entry["addr"].rsplit(":", 1)[1]) in mine and int(entry["id"]) != own_id)
    finally:
        client.close()


async def test_1000_handles_waiting_at_once_share_a_few_redis_connections_and_all_get_their_results(
    redis_url: str, backend: QueueBackend, model: TrainableModel, worker: WorkerProcess
) -> None:
    # Other tests' clients may still be open in this process: count what the waiting adds to them.
    before = _clients_of_this_process(redis_url)
    paused = [worker.proc.pid, worker.child_pid]
    for pid in paused:  # the worker holds still, so every handle is still waiting when counted
        os.kill(pid, signal.SIGSTOP)
    try:
        jobs = [await backend._submit(model, "register") for _ in range(HANDLES)]
        waits = [asyncio.create_task(job.result(timeout=300)) for job in jobs]
        await asyncio.sleep(2.0)
        assert not any(wait.done() for wait in waits)
        added = _clients_of_this_process(redis_url) - before
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    started = time.monotonic()
    results = await asyncio.gather(*waits)
    print(f"\n{HANDLES} handles waiting: {added} Redis connections more in this process ({before} before); "
          f"all results in {time.monotonic() - started:.1f}s")
    assert added < 5
    assert {r.step for r in results} == {0} and len({r.job_id for r in results}) == HANDLES
