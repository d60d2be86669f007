"""A soak: 200 small jobs from 4 concurrent producers for 2 models, the trainer killed and restarted twice."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from producer import QueueBackend, TrainableModel
from tests.chaos.conftest import kill_whole_worker, rss_mib, saved_steps
from tests.support.groups import make_group
from tests.support.services import WorkerProcess, start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

JOBS = 200
PRODUCERS = 4
KILL_AFTER = (JOBS // 3, 2 * JOBS // 3)  # whole-worker kills, by jobs completed
RSS_FROM = 2 * JOBS // 3 + 20  # memory is measured on the last child, once it trained both models


async def test_200_jobs_from_4_producers_with_the_trainer_killed_twice_stay_gapless_and_exactly_once(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis()
    root = tmp_path / "checkpoints"
    workers: list[WorkerProcess] = [start_trainer_worker(server.url, str(tiny_model), tmp_path / "w0",
                                                         checkpoint_root=root)]
    backends = [QueueBackend(server.url, path=str(tmp_path / f"logs{i}")) for i in range(PRODUCERS)]
    try:
        models = [TrainableModel(f"soak{i}", "chaos", base_model=str(tiny_model)) for i in range(2)]
        for model in models:
            await model.register(backends[0])
        for model in models:  # one warm-up step per model
            await backends[0].train(model, [make_group(n_trajectories=2, n_tokens=4)], timeout=120)
        done: list[tuple[str, int]] = []
        rss: dict[str, float] = {}

        async def produce(p: int) -> None:
            backend = backends[p]
            for j in range(JOBS // PRODUCERS):
                model = models[(p + j) % 2]
                group = make_group(n_trajectories=2, n_tokens=4, seed=p * 1000 + j)
                result = await backend.train(model, [group], timeout=300)
                done.append((model.name, result.step))
                if len(done) == RSS_FROM:
                    rss["start"] = rss_mib(workers[-1].child_pid)

        async def kill_and_restart() -> list[float]:
            recoveries = []
            for n, threshold in enumerate(KILL_AFTER, start=1):
                while len(done) < threshold:
                    await asyncio.sleep(0.02)
                victim = workers[-1]
                killed_at, done_then = time.monotonic(), len(done)
                await asyncio.to_thread(kill_whole_worker, victim.proc.pid, victim.child_pid)
                workers.append(await asyncio.to_thread(
                    start_trainer_worker, server.url, str(tiny_model), tmp_path / f"w{n}", checkpoint_root=root))
                while len(done) == done_then:
                    await asyncio.sleep(0.02)
                recoveries.append(time.monotonic() - killed_at)
            return recoveries

        started = time.monotonic()
        *_, recoveries = await asyncio.gather(*(produce(p) for p in range(PRODUCERS)), kill_and_restart())
        soak_s = time.monotonic() - started
        rss["end"] = rss_mib(workers[-1].child_pid)

        for model in models:
            steps = sorted(step for name, step in done if name == model.name)
            assert steps == list(range(2, 2 + JOBS // 2)), f"{model.name}: steps are not gapless and unique"
            assert await backends[0].get_step(model) == 1 + JOBS // 2
            assert saved_steps(server.url, model) == list(range(2 + JOBS // 2)), "one event per step"
        print(f"\nsoak: {JOBS} jobs, {PRODUCERS} producers, 2 models, trainer killed twice, in {soak_s:.1f}s "
              f"({JOBS / soak_s:.1f} jobs/s); kill -> next result {', '.join(f'{r:.1f}s' for r in recoveries)}; "
              f"last training child RSS {rss['start']:.0f} -> {rss['end']:.0f} MiB")
        assert rss["end"] < rss["start"] * 1.25 + 50, "the training child's memory grew with the number of jobs"
    finally:
        for backend in backends:
            await backend.close()
        for worker in workers:
            worker.stop()
