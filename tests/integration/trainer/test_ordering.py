"""Many producers, one model: steps 1..N, gapless, no repeats, in submission order."""

from __future__ import annotations

import pytest

from producer import JobStatus, QueueBackend, TrainableModel
from tests.support.groups import make_groups
from tests.support.producers import assert_gapless_in_submission_order, submit_from_producers

pytestmark = pytest.mark.slow


async def test_three_producers_get_gapless_steps_in_submission_order(
    redis_url: str, model: TrainableModel
) -> None:
    """Concurrent submits have no order between them; a submit that returned before another began does."""
    calls, step_of = await submit_from_producers(redis_url, model, producers=3, per_producer=4)
    assert_gapless_in_submission_order(calls, step_of)


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
