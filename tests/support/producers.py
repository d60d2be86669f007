"""Several producers submitting to one model at once, and what their steps must look like."""

from __future__ import annotations

import asyncio
import time

from producer import QueueBackend, TrainableModel
from tests.support.groups import make_groups

Call = tuple[float, float, str]  # (submit began, submit returned, job id)


async def submit_from_producers(redis_url: str, model: TrainableModel, *, producers: int = 3,
                                per_producer: int = 4) -> tuple[list[Call], dict[str, int]]:
    """Each producer (its own ``QueueBackend``) submits ``per_producer`` small jobs in a row, all producers
    at once; returns every call and the step each job made."""
    backends = [QueueBackend(redis_url) for _ in range(producers)]
    calls: list[Call] = []

    async def produce(backend: QueueBackend) -> None:
        for _ in range(per_producer):
            began = time.monotonic()
            job = await backend.submit_train(model, make_groups(1, rewards=[0.0, 1.0], n_tokens=4))
            calls.append((began, time.monotonic(), job.job_id))

    await asyncio.gather(*(produce(b) for b in backends))
    step_of = {job_id: (await backends[0].job(job_id).result(timeout=180)).step for _, _, job_id in calls}
    for backend in backends:
        await backend.close()
    return calls, step_of


def assert_gapless_in_submission_order(calls: list[Call], step_of: dict[str, int], first_step: int = 1) -> None:
    """Steps ``first_step ...`` with no gap or repeat, and a job submitted after another returned ran after it.

    Concurrent submits have no order between them; each producer's own sequence does.
    """
    assert sorted(step_of.values()) == list(range(first_step, first_step + len(calls)))
    ordered_pairs = [(a, b) for a in calls for b in calls if a[1] < b[0]]
    assert len(ordered_pairs) >= len(calls)
    for a, b in ordered_pairs:
        assert step_of[a[2]] < step_of[b[2]], "a job submitted later ran first"
