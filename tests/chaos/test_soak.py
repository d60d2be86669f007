"""A soak: 200 small jobs from 4 concurrent producers for 2 models, through one worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from producer import QueueBackend, TrainableModel
from tests.chaos.conftest import rss_mib
from tests.support.groups import make_group
from tests.support.services import start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(600)]

JOBS = 200
PRODUCERS = 4


async def test_200_jobs_from_4_producers_for_2_models_all_complete_with_gapless_steps_and_stable_memory(
    make_redis, tiny_model: Path, tmp_path: Path
) -> None:
    server = make_redis()
    worker = start_trainer_worker(server.url, str(tiny_model), tmp_path / "w")
    try:
        backends = [QueueBackend(server.url, path=str(tmp_path / f"logs{i}")) for i in range(PRODUCERS)]
        models = [TrainableModel(f"soak{i}", "chaos", base_model=str(tiny_model)) for i in range(2)]
        for model in models:
            await model.register(backends[0])
        # One warm-up step per model, so the start figure includes the optimizer state and allocator pools.
        for model in models:
            await backends[0].train(model, [make_group(n_trajectories=2, n_tokens=4)], timeout=120)
        child = worker.child_pid
        rss_start = rss_mib(child)

        async def produce(p: int) -> list[tuple[str, int]]:
            backend, steps = backends[p], []
            for j in range(JOBS // PRODUCERS):
                model = models[(p + j) % 2]
                group = make_group(n_trajectories=2, n_tokens=4, seed=p * 1000 + j)
                result = await backend.train(model, [group], timeout=300)
                steps.append((model.name, result.step))
            return steps

        started = time.monotonic()
        per_producer = await asyncio.gather(*(produce(p) for p in range(PRODUCERS)))
        soak_s = time.monotonic() - started
        rss_end = rss_mib(child)

        for model in models:
            steps = sorted(step for done in per_producer for name, step in done if name == model.name)
            assert steps == list(range(2, 2 + JOBS // 2)), f"{model.name}: steps are not gapless and unique"
            assert await backends[0].get_step(model) == 1 + JOBS // 2
        assert worker.child_pid == child, "the training child was never replaced"
        print(f"\nsoak: {JOBS} jobs, {PRODUCERS} producers, 2 models in {soak_s:.1f}s "
              f"({JOBS / soak_s:.1f} jobs/s); training child RSS {rss_start:.0f} -> {rss_end:.0f} MiB")
        assert rss_end < rss_start * 1.25 + 50, "the training child's memory grew with the number of jobs"
        for backend in backends:
            await backend.close()
    finally:
        worker.stop()
