"""ART's ``art.utils``: ``retry``, ``iterate_dataset``, ``limit_concurrency``."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

import tenacity

__all__ = ["DatasetBatch", "iterate_dataset", "limit_concurrency", "retry"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def retry(
    max_attempts: int = 3,
    delay: float = 0.25,
    backoff_factor: float = 2.0,
    exceptions: tuple[type[BaseException], ...] = (Exception,),
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Retry a function, sync or async, on ``exceptions``: up to ``max_attempts`` calls in all.

    The waits between calls are ``delay``, ``delay * backoff_factor``, ...; the
    last exception is raised as it was. ``on_retry(exception, attempt)`` is
    called before each wait (by default a warning is logged).
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        assert exc is not None
        if on_retry is not None:
            on_retry(exc, state.attempt_number)
        else:
            name = getattr(state.fn, "__name__", "call")
            log.warning("retry %d/%d of %s after %s: %s", state.attempt_number, max_attempts, name,
                        type(exc).__name__, exc)

    return tenacity.retry(
        stop=tenacity.stop_after_attempt(max_attempts),
        wait=tenacity.wait_exponential(multiplier=delay, exp_base=backoff_factor, min=delay),
        retry=tenacity.retry_if_exception_type(exceptions),
        before_sleep=before_sleep,
        reraise=True,
    )


@dataclass(frozen=True)
class DatasetBatch(Generic[T]):
    """One step's share of a dataset: its ``items``, the global ``step``, the ``epoch`` and the step within it."""

    items: list[T]
    step: int
    epoch: int
    epoch_step: int


def iterate_dataset(
    dataset: Sequence[T],
    groups_per_step: int = 1,
    num_epochs: int = 1,
    initial_step: int = 0,
    use_tqdm: bool = True,
    seed: int = 0,
) -> Iterator[DatasetBatch[T]]:
    """Batches of ``groups_per_step`` items, shuffled anew each epoch (seeded), from ``initial_step`` on.

    Resuming at ``initial_step`` yields exactly the batches an uninterrupted
    run would have yielded from that step.
    """
    if groups_per_step < 1:
        raise ValueError(f"groups_per_step must be >= 1, got {groups_per_step}")
    steps_per_epoch = math.ceil(len(dataset) / groups_per_step)
    total = steps_per_epoch * num_epochs
    pbar: Any = None
    if use_tqdm:
        from tqdm.auto import tqdm

        pbar = tqdm(initial=initial_step, total=total, desc="steps", unit="step")
    try:
        for step in range(initial_step, total):
            epoch, epoch_step = divmod(step, steps_per_epoch)
            order = list(range(len(dataset)))
            random.Random(seed + epoch).shuffle(order)
            chosen = order[epoch_step * groups_per_step:(epoch_step + 1) * groups_per_step]
            yield DatasetBatch([dataset[i] for i in chosen], step, epoch, epoch_step)
            if pbar is not None:
                pbar.update(1)
    finally:
        if pbar is not None:
            pbar.close()


def limit_concurrency(
    n: int, derive_key: Callable[..., Any] | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """At most ``n`` calls of the decorated coroutine function at once (per ``derive_key(*args, **kwargs)``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    def decorator(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        semaphores: dict[Any, asyncio.Semaphore] = {}

        @functools.wraps(func)
        async def limited(*args: P.args, **kwargs: P.kwargs) -> R:
            key = derive_key(*args, **kwargs) if derive_key is not None else None
            semaphore = semaphores.setdefault(key, asyncio.Semaphore(n))
            async with semaphore:
                return await func(*args, **kwargs)

        return limited

    return decorator
