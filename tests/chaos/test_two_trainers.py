"""Two trainer workers on one queue: one writer at a time (the leader), the other a hot standby that takes over."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from producer import JobStatus, QueueBackend, TrainableModel, keys
from producer.cli import main as trainq
from tests.chaos.conftest import kill_whole_worker, saved_steps, wait_status
from tests.support.groups import make_group, make_groups
from tests.support.services import WorkerProcess, start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def leader_gauge(worker: WorkerProcess) -> float:
    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10).text
    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.name == "trainq_leader"]
    assert len(values) == 1, text
    return values[0]


async def test_two_trainers_on_one_queue_never_write_together_and_the_standby_finishes_the_leaders_job(
    make_redis, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_redis()
    root = tmp_path / "checkpoints"
    with ThreadPoolExecutor(2) as pool:  # both start at once, as two replicas of a deployment would
        starting = [pool.submit(start_trainer_worker, server.url, str(tiny_model), tmp_path / name,
                                checkpoint_root=root, hostname=f"{name}@test") for name in ("first", "second")]
    workers = [f.result() for f in starting if f.exception() is None]
    if len(workers) < len(starting):
        for worker in workers:
            worker.stop()
        for f in starting:
            f.result()
    client = redis.Redis.from_url(server.url)
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("shared", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            big = await backend.submit_train(model, make_groups(16, n_trajectories=8, n_tokens=256))
            small = [await backend.submit_train(model, [make_group(seed=i)]) for i in range(2)]
            await wait_status(big, JobStatus.RUNNING)
            runner = client.hget(keys.job_key(big.job_id), "worker").decode()
            leader, standby = sorted(workers, key=lambda w: w.hostname != runner)
            assert leader.hostname == runner

            # While the leader trains, the standby takes nothing: the queued jobs wait.
            await asyncio.sleep(1.5)
            assert [await job.status() for job in small] == [JobStatus.QUEUED] * 2, "a second writer took a job"
            assert f"{big.job_id}] received" not in standby.log_tail(2000)
            assert (leader_gauge(leader), leader_gauge(standby)) == (1.0, 0.0)
            assert trainq(["status", "--redis-url", server.url]) == 0
            status = capsys.readouterr().out
            assert f"{leader.hostname}" in status and "leader" in status and "standby" in status

            killed_at = time.monotonic()
            kill_whole_worker(leader.proc.pid, leader.child_pid)
            leader.proc.wait(timeout=10)
            results = await asyncio.gather(big.result(timeout=120), *(job.result(timeout=120) for job in small))
            recovered_s = time.monotonic() - killed_at

            assert [r.step for r in results] == [1, 2, 3], "gapless, in submission order"
            assert (await big.record()).attempts == 2
            assert client.hget(keys.job_key(big.job_id), "worker").decode() == standby.hostname
            assert await backend.get_step(model) == 3
            assert saved_steps(server.url, model) == [0, 1, 2, 3]
            writers = [json.loads((root / "chaos" / "shared" / "checkpoints" / f"{s:04d}" / "trainq.json").read_text())
                       for s in range(4)]
            tokens = [w["token"] for w in writers]
            assert tokens == sorted(tokens), f"a step was written under an older fencing token: {tokens}"
            assert [w["worker"] for w in writers[1:]] == [standby.hostname] * 3
            assert leader_gauge(standby) == 1.0
            print(f"\nleader killed mid-job: the standby finished its job and the two queued ones "
                  f"{recovered_s:.1f}s after the kill (attempts 2, steps 1-3, tokens {tokens})")
    finally:
        for worker in workers:
            worker.stop()
        client.close()
