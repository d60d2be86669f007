"""A real trainer worker training on two ranks (``--nproc-per-node 2``): the spine, and a rank killed mid-job."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from producer import JobStatus, QueueBackend, TrainableModel
from producer.cli import main as trainq
from tests.support.groups import make_groups
from tests.support.producers import assert_gapless_in_submission_order, submit_from_producers
from tests.support.services import WorkerProcess, start_trainer_worker

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def worker(redis_url: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = start_trainer_worker(redis_url, str(tiny_model), tmp_path_factory.mktemp("group-worker"),
                                extra=["--nproc-per-node", "2", "--collective-timeout-s", "60"], ready_timeout=300)
    yield proc
    proc.stop()


def rank_process(worker: WorkerProcess, rank: int) -> psutil.Process:
    for proc in psutil.Process(worker.proc.pid).children(recursive=True):
        try:
            if "trainer_worker.group.rank" in " ".join(proc.cmdline()) and proc.environ().get("RANK") == str(rank):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise LookupError(f"no rank {rank} under the worker")


async def test_two_ranks_serve_producers_and_survive_a_killed_rank(
    redis_url: str, backend: QueueBackend, model: TrainableModel, worker: WorkerProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert trainq(["status", "--redis-url", redis_url]) == 0
    assert "2 ranks on 1 node" in capsys.readouterr().out

    calls, step_of = await submit_from_producers(redis_url, model, producers=3, per_producer=2)
    assert_gapless_in_submission_order(calls, step_of)

    victim = rank_process(worker, 1)
    job = await backend.submit_train(model, make_groups(8, n_trajectories=8, n_tokens=192))  # seconds on 2 ranks
    deadline = asyncio.get_running_loop().time() + 60
    while await job.status() is not JobStatus.RUNNING:
        assert asyncio.get_running_loop().time() < deadline, "job never started"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    os.kill(victim.pid, signal.SIGKILL)

    result = await job.result(timeout=300)
    assert result.step == 7
    assert (await job.record()).attempts == 1  # run again in place, on the restarted group
    assert "the training group failed during train" in worker.log_tail(400), "the kill missed the job"
    folder = worker.checkpoint_root / model.project / model.name / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [f"{s:04d}" for s in range(8)], "a step lost, doubled or half-written"
    assert rank_process(worker, 1).pid != victim.pid

    assert (await backend.train(model, make_groups(1), timeout=120)).step == 8

    async with httpx.AsyncClient() as client:
        scrape = (await client.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")).text
    assert "trainq_group_ranks 2.0" in scrape
    assert "trainq_group_restarts_total 1.0" in scrape
    assert 'trainq_rank_tokens_per_second{rank="1"}' in scrape
    assert 'trainq_collective_seconds_total{rank="0"}' in scrape
