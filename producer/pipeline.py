"""Pipelined training: sample the groups of step n+1 while step n trains, within a staleness bound.

    async for step in train_pipelined(backend, model, sample, steps=15, learning_rate=1e-3):
        await model.log(step.groups, metrics=step.result.metrics, step=step.result.step, split="train")

The serial loop waits for the trainer after every sampling round and for the
sampler after every step. Here a round of rollouts starts as soon as it may:
rollouts for job ``n`` sample from the newest served step, which is at least
``n - max_staleness`` steps past the start (the job ``n - max_staleness - 1``
before it has finished), so every group is at most ``max_staleness`` steps
old when it trains. The trainer refuses older groups too (``max_staleness`` is
passed on to each job), and its importance ratio against the sampler's
logprobs corrects for the policy having moved meanwhile (bounded asynchrony,
as prime-rl's orchestrator runs it). Jobs are submitted in order, so steps
stay gapless and in submission order; results are yielded in that order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from producer.types import TrainResult, TrajectoryGroup

if TYPE_CHECKING:
    from producer.backend import Backend
    from producer.jobs import TrainJob
    from producer.model import TrainableModel

__all__ = ["PipelinedStep", "train_pipelined"]

Sampler = Callable[[], Awaitable[list[TrajectoryGroup]]]


@dataclass(frozen=True)
class PipelinedStep:
    """One trained step of the pipeline: its result, the groups it trained on, and where they came from."""

    result: TrainResult
    groups: list[TrajectoryGroup]
    sampled_step: int
    """The step the groups were sampled at (the model's latest served step when their round began)."""
    sample_s: float
    """Seconds the round of rollouts took."""


async def train_pipelined(
    backend: Backend,
    model: TrainableModel,
    sample: Sampler,
    *,
    steps: int,
    max_staleness: int = 1,
    timeout: float | None = None,
    **options: Any,
) -> AsyncIterator[PipelinedStep]:
    """Run ``steps`` train steps, sampling each round while the steps before it train.

    Args:
        backend: a registered model's backend (``LocalBackend`` or ``QueueBackend``).
        model: the trainable model; rollouts should ask for ``model.get_inference_name()``,
            which names the newest step served when the round begins.
        sample: called once per step, returns that step's groups (e.g. a
            ``gather_trajectory_groups`` call).
        steps: how many train steps to run.
        max_staleness: how many steps old a group may be when it trains; 0 is the serial loop.
        timeout: seconds to wait for each step's result (``None``: as long as it takes).
        options: ``backend.train``'s keywords (``learning_rate=...``), for every step.

    Yields each step in order as soon as it is trained and served. The caller
    may log between steps; the next round of rollouts is already sampling. A
    loop left early leaves the jobs it submitted queued: they still train.
    """
    if not isinstance(max_staleness, int) or isinstance(max_staleness, bool) or max_staleness < 0:
        raise ValueError(f"max_staleness must be an int >= 0, got {max_staleness!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    in_flight: deque[tuple[TrainJob, list[TrajectoryGroup], int, float]] = deque()
    for _ in range(steps):
        # Job n may sample only once job n - max_staleness - 1 is trained and served.
        while len(in_flight) > max_staleness:
            yield await _finish(backend, model, in_flight.popleft(), timeout)
        sampled_step = model._step  # what model.get_inference_name() names for this round
        started = time.monotonic()
        groups = await sample()
        sample_s = time.monotonic() - started
        job = await backend.submit_train(model, groups, max_staleness=max_staleness, **options)
        in_flight.append((job, groups, sampled_step, sample_s))
    while in_flight:
        yield await _finish(backend, model, in_flight.popleft(), timeout)


async def _finish(
    backend: Backend,
    model: TrainableModel,
    submitted: tuple[TrainJob, list[TrajectoryGroup], int, float],
    timeout: float | None,
) -> PipelinedStep:
    job, groups, sampled_step, sample_s = submitted
    result = await backend.collect(model, job, timeout=timeout)
    return PipelinedStep(result=result, groups=groups, sampled_step=sampled_step, sample_s=sample_s)

