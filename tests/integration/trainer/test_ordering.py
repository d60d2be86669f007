"""Many producers, one model: steps 1..N, gapless, no repeats, in submission order."""

from __future__ import annotations

import asyncio
import time

import pytest

from producer import JobStatus, QueueBackend, TrainableModel
from tests.support.groups import make_groups

pytestmark = pytest.mark.slow


async def test_three_producers_get_gapless_steps_in_submission_order(
    redis_url: str, model: TrainableModel
) -> None:
    """Concurrent submits have no order between them; a submit that returned before another began does."""
    producers = [QueueBackend(redis_url) for _ in range(3)]
    per_producer = 4
    calls: list[tuple[float, float, str]] = []  # (submit began, submit returned, job id)

    async def produce(backend: QueueBackend) -> None:
        for _ in range(per_producer):
            began = time.monotonic()
            job = await backend.submit_train(model, make_groups(1, rewards=[0.0, 1.0], n_tokens=4))
            calls.append((began, time.monotonic(), job.job_id))

    await asyncio.gather(*(produce(b) for b in producers))
    step_of = {job_id: (await producers[0].job(job_id).result(timeout=120)).step for _, _, job_id in calls}
    for backend in producers:
        await backend.close()

    assert sorted(step_of.values()) == list(range(1, 3 * per_producer + 1))
    ordered_pairs = [(a, b) for a in calls for b in calls if a[1] < b[0]]
    assert len(ordered_pairs) >= 3 * per_producer  # at least each producer's own sequence is ordered
    for a, b in ordered_pairs:
        assert step_of[a[2]] < step_of[b[2]], "a job submitted later ran first"


async def test_cancel_while_queued_skips_the_job_and_keeps_steps_gapless(
    backend: QueueBackend, model: TrainableModel
) -> None:
    first = await backend.submit_train(model, make_groups(16, n_trajectories=8, n_tokens=128))  # runs for seconds
    second = await backend.submit_train(model, make_groups(1))
    third = await backend.submit_train(model, make_groups(1))
    assert await second.cancel() is True
    assert (await first.result(timeout=120)).step == 1
    assert (await third.result(timeout=120)).step == 2
    assert await second.status() is JobStatus.CANCELLED
    assert await first.cancel() is False  # already ran
