"""The pipelined loop on a real worker: rounds sample while steps train, never past the staleness bound."""

from __future__ import annotations

import asyncio

import pytest

from producer import JobStatus, QueueBackend, TrainableModel
from producer.pipeline import train_pipelined
from tests.support.groups import make_group

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
async def test_no_group_trains_older_than_the_bound_and_steps_stay_gapless_and_in_order(
    backend: QueueBackend, model: TrainableModel, max_staleness: int
) -> None:
    steps = 6
    rounds: list[tuple[int, list[JobStatus]]] = []  # (the step sampled at, the statuses of the jobs in flight)
    submitted: list[str] = []

    async def sample() -> list:
        sampled_at = model._step  # the step model.get_inference_name() names for this round
        in_flight = [await backend.job(job_id).status() for job_id in submitted]
        rounds.append((sampled_at, in_flight))
        await asyncio.sleep(0.05)  # a round of rollouts takes a while; the trainer goes on meanwhile
        return [make_group(n_trajectories=3, n_tokens=64, seed=len(rounds) * 10 + g, rewards=[0.0, 0.5, 1.0],
                           sampled_step=sampled_at) for g in range(2)]

    original_submit = backend.submit_train

    async def submit(*args, **kwargs):  # noqa: ANN002, ANN003 - records the job ids, changes nothing
        job = await original_submit(*args, **kwargs)
        submitted.append(job.job_id)
        return job

    backend.submit_train = submit  # type: ignore[method-assign]
    trained = [step async for step in train_pipelined(backend, model, sample, steps=steps,
                                                     max_staleness=max_staleness, learning_rate=1e-3, timeout=120)]

    assert [step.result.step for step in trained] == list(range(1, steps + 1)), "gapless, in submission order"
    for n, step in enumerate(trained):
        assert step.result.metrics["num_groups_stale_dropped"] == 0.0
        # The job that made step n+1 trained after step n: its groups were at most max_staleness steps old.
        assert n - step.sampled_step <= max_staleness
        assert step.result.metrics["staleness_max"] == n - step.sampled_step
    if max_staleness == 0:
        assert all(not in_flight or in_flight[-1].is_terminal for _, in_flight in rounds), "serial: nothing in flight"
    else:
        # Rounds sampled while a step was still queued or training: the loop did not wait for the trainer.
        overlapped = [r for r in rounds[1:] if any(not status.is_terminal for status in r[1])]
        assert len(overlapped) >= steps // 2
        assert max(n - step.sampled_step for n, step in enumerate(trained)) == max_staleness


async def test_a_bound_below_zero_is_refused(backend: QueueBackend, model: TrainableModel) -> None:
    async def sample() -> list:
        raise AssertionError("never sampled")

    with pytest.raises(ValueError, match="max_staleness must be an int >= 0"):
        async for _ in train_pipelined(backend, model, sample, steps=1, max_staleness=-1):
            pass
