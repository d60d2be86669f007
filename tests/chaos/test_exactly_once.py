"""A step made but not recorded: the worker dies between the checkpoint's rename and its commit in Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from producer import JobStatus, QueueBackend, TrainableModel
from tests.chaos.conftest import kill_whole_worker, saved_steps, wait_status
from tests.support.groups import make_groups
from tests.support.services import start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


async def test_delete_checkpoints_between_a_step_and_its_redelivery_makes_no_second_step(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis()
    root = tmp_path / "checkpoints"
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w1", checkpoint_root=root)
    client = redis.Redis.from_url(server.url)
    restarted = None
    try:
        async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
            model = TrainableModel("once", "chaos", base_model=str(tiny_model))
            await model.register(backend)
            # Seconds of training, so the write pause below lands before the step is renamed and committed.
            made = await backend.submit_train(model, make_groups(16, n_trajectories=8, n_tokens=256))
            await wait_status(made, JobStatus.RUNNING)
            step_1 = root / "chaos" / "once" / "checkpoints" / "0001"
            # Writes wait (reads go on): the step is trained and renamed into place, its record is not written.
            client.execute_command("CLIENT", "PAUSE", "120000", "WRITE")
            try:
                deadline = time.monotonic() + 120
                while not step_1.is_dir():
                    assert time.monotonic() < deadline, "the step was never written"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)
                kill_whole_worker(worker.proc.pid, worker.child_pid)
                worker.proc.wait(timeout=10)
                # A command the worker sent before it died and Redis holds back would run at the unpause:
                # dropping its connections makes it as if the worker died before sending it.
                for entry in client.client_list():
                    if entry["name"].startswith("trainq-trainer"):
                        client.execute_command("CLIENT", "KILL", "ID", entry["id"])
            finally:
                client.execute_command("CLIENT", "UNPAUSE")
            assert await made.status() is JobStatus.RUNNING, "the record was written before the kill"

            # Queued before the worker comes back: another step, then a deletion keeping only the latest.
            later = await backend.submit_train(model, make_groups(1))
            deletion = await backend._submit(model, "delete_checkpoints", keep_steps=[])
            restart_at = time.monotonic()
            restarted = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w2", checkpoint_root=root)
            first, second = await asyncio.gather(made.result(timeout=90), later.result(timeout=90))
            committed_s = time.monotonic() - restart_at
            deleted = (await deletion.result(timeout=60)).step

            assert sorted([first.step, second.step]) == [1, 2], "each job made one step, none made two"
            assert await backend.get_step(model) == 2
            assert saved_steps(server.url, model) == [0, 1, 2], "one checkpoint event per step"
            assert (await made.record()).attempts == 2
            remaining = sorted(p.name for p in (root / "chaos" / "once" / "checkpoints").iterdir())
            assert remaining == ["0002"] and deleted == 2, "the deletion kept the latest step only"
            assert f"job {made.job_id} made step 1" in restarted.log_tail(400), "rolled forward, not trained again"
            print(f"\nstep renamed, commit lost with the worker: committed on redelivery, without training "
                  f"(train_s {first.train_s:.1f}s as first recorded), {committed_s:.1f}s after the restart began")
    finally:
        for proc in (worker, restarted):
            if proc is not None:
                proc.stop()
        client.close()
