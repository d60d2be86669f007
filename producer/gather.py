"""Run many rollouts concurrently and collect them into trajectory groups, as ART's helper does.

    groups = await gather_trajectory_groups(
        [(rollout(model, scenario) for _ in range(8)) for scenario in scenarios],
        pbar_desc="train",
        max_exceptions=0.1,
    )

Each item is either an iterable of awaitables of ``Trajectory`` (one group,
its rollouts run concurrently) or an awaitable of a whole ``TrajectoryGroup``.
Every rollout of every group runs at the same time: the inference server
batches them, which is where the throughput comes from.
"""

from __future__ import annotations

import asyncio
import inspect
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Union

from producer.types import ExceptionInfo, Trajectory, TrajectoryGroup

__all__ = ["gather_trajectory_groups"]

GroupSpec = Union[Awaitable[TrajectoryGroup], Iterable[Awaitable[Trajectory]]]
AfterEach = Callable[
    [TrajectoryGroup],
    "TrajectoryGroup | list[TrajectoryGroup] | None | Awaitable[TrajectoryGroup | list[TrajectoryGroup] | None]",
]


class _Failed:
    """A rollout's exception, kept because it was within ``max_exceptions``."""

    def __init__(self, exc: Exception) -> None:
        self.info = ExceptionInfo(
            type=type(exc).__name__,
            message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )


class _Progress:
    """The shared counters behind the progress bar and the exception budget."""

    def __init__(self, desc: str | None, total: int, max_exceptions: int) -> None:
        self.max_exceptions = max_exceptions
        self.exceptions = 0
        self.reward_sum = 0.0
        self.trajectories = 0
        self.pbar: Any = None
        if desc is not None:
            from tqdm.auto import tqdm

            self.pbar = tqdm(desc=desc, total=total, unit="rollout", dynamic_ncols=True)

    def done(self, trajectories: list[Trajectory], expected: int = 1) -> None:
        self.trajectories += len(trajectories)
        self.reward_sum += sum(t.reward for t in trajectories)
        self._advance(len(trajectories), expected)

    def failed(self, exc: Exception) -> _Failed:
        """Count ``exc``; re-raise it if the budget is spent, else return it as data."""
        self.exceptions += 1
        if self.exceptions > self.max_exceptions:
            raise exc
        self._advance(1, 1)
        return _Failed(exc)

    def _advance(self, n: int, expected: int) -> None:
        if self.pbar is None:
            return
        if n != expected:  # a whole-group awaitable was counted as one rollout until it finished
            self.pbar.total += n - expected
        postfix = {"reward": f"{self.reward_sum / self.trajectories:.3f}" if self.trajectories else "-"}
        if self.exceptions:
            postfix["exceptions"] = str(self.exceptions)
        self.pbar.set_postfix(postfix, refresh=False)
        self.pbar.update(n)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()


async def gather_trajectory_groups(
    groups: Iterable[GroupSpec],
    *,
    pbar_desc: str | None = "gather",
    max_exceptions: int | float = 0,
    after_each: AfterEach | None = None,
) -> list[TrajectoryGroup]:
    """Run every rollout concurrently; return the groups in the order given.

    Parameters:
        groups: items that are each an iterable of awaitables of ``Trajectory``
            (one group) or an awaitable of a ``TrajectoryGroup``.
        pbar_desc: label of the progress bar (rollouts done, running mean
            reward, exceptions) on stderr; ``None`` hides it.
        max_exceptions: how many rollouts may raise before the gather fails: an
            ``int`` count, or a ``float`` below 1 as a fraction of all rollouts.
            An exception within the budget is recorded in its group's
            ``exceptions`` (type, message, traceback); the one past it is
            re-raised after the other rollouts are cancelled.
        after_each: called (sync or async) with each group as it completes;
            returns the group to keep, a replacement group, a list of groups, or
            ``None`` to keep the group as it is. Use it to score groups as they
            finish, or to split and filter them.

    A group left with no trajectory (every rollout raised) is left out of the
    result: a group must hold at least one trajectory to be trained on.
    """
    specs = _as_specs(groups)
    total = sum(len(spec) if isinstance(spec, list) else 1 for spec in specs)
    progress = _Progress(pbar_desc, total, _exception_budget(max_exceptions, total))

    rollout_tasks: list[asyncio.Future[Any]] = []
    group_tasks: list[asyncio.Task[list[TrajectoryGroup]]] = []
    for spec in specs:
        tasks: list[asyncio.Future[Any]]
        if isinstance(spec, list):
            tasks = [asyncio.ensure_future(_rollout(aw, progress)) for aw in spec]
        else:
            tasks = [asyncio.ensure_future(_group_rollout(spec, progress))]
        rollout_tasks.extend(tasks)
        group_tasks.append(asyncio.ensure_future(_finish_group(tasks, after_each)))

    try:
        finished = await asyncio.gather(*group_tasks)
    except BaseException:
        # A rollout went past the budget (or we were cancelled): stop the rest
        # rather than leave them sampling into the void.
        for task in (*rollout_tasks, *group_tasks):
            task.cancel()
        await asyncio.gather(*rollout_tasks, *group_tasks, return_exceptions=True)
        raise
    finally:
        progress.close()
    return [group for produced in finished for group in produced if group.trajectories]


def _as_specs(items: Iterable[object]) -> list[Awaitable[TrajectoryGroup] | list[Awaitable[Trajectory]]]:
    specs: list[Awaitable[TrajectoryGroup] | list[Awaitable[Trajectory]]] = []
    try:
        for item in items:
            specs.append(_as_spec(item))
    except (TypeError, ValueError):
        # Close the rollouts already created so that none is left "never awaited".
        for spec in specs:
            for awaitable in spec if isinstance(spec, list) else [spec]:
                if inspect.iscoroutine(awaitable):
                    awaitable.close()
        raise
    return specs


def _as_spec(item: object) -> Awaitable[TrajectoryGroup] | list[Awaitable[Trajectory]]:
    # Awaitable first: an asyncio.Future is also iterable, but means one group result.
    if inspect.isawaitable(item):
        return item
    if isinstance(item, Iterable) and not isinstance(item, (str, bytes, TrajectoryGroup, Trajectory)):
        rollouts = list(item)
        for rollout in rollouts:
            if not inspect.isawaitable(rollout):
                for other in rollouts:
                    if inspect.iscoroutine(other):
                        other.close()
                raise TypeError(f"a group's rollouts must be awaitables of Trajectory, got {type(rollout).__name__}")
        return rollouts
    raise TypeError(
        "each item must be an awaitable of TrajectoryGroup or an iterable of awaitables of Trajectory, "
        f"got {type(item).__name__}"
    )


def _exception_budget(max_exceptions: int | float, total: int) -> int:
    if isinstance(max_exceptions, bool) or max_exceptions < 0:
        raise ValueError(f"max_exceptions must be an int >= 0 or a fraction in [0, 1), got {max_exceptions!r}")
    if isinstance(max_exceptions, float) and max_exceptions < 1:
        return int(max_exceptions * total)
    return int(max_exceptions)


async def _rollout(awaitable: Awaitable[Trajectory], progress: _Progress) -> Trajectory | _Failed:
    try:
        trajectory = await awaitable
    except Exception as exc:  # noqa: BLE001 - the budget decides whether it propagates
        return progress.failed(exc)
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"a rollout returned {type(trajectory).__name__}, expected Trajectory")
    progress.done([trajectory])
    return trajectory


async def _group_rollout(awaitable: Awaitable[TrajectoryGroup], progress: _Progress) -> TrajectoryGroup | _Failed:
    try:
        group = await awaitable
    except Exception as exc:  # noqa: BLE001
        return progress.failed(exc)
    if not isinstance(group, TrajectoryGroup):
        raise TypeError(f"a group rollout returned {type(group).__name__}, expected TrajectoryGroup")
    progress.done(group.trajectories, expected=1)
    return group


async def _finish_group(tasks: list[asyncio.Future[Any]], after_each: AfterEach | None) -> list[TrajectoryGroup]:
    results = await asyncio.gather(*tasks)
    if len(results) == 1 and isinstance(results[0], TrajectoryGroup):
        group = results[0]
    else:
        group = TrajectoryGroup(
            [r for r in results if isinstance(r, Trajectory)],
            exceptions=[r.info for r in results if isinstance(r, _Failed)],
        )
    if after_each is None:
        return [group]
    processed = after_each(group)
    if inspect.isawaitable(processed):
        processed = await processed
    if processed is None:
        return [group]
    if isinstance(processed, TrajectoryGroup):
        return [processed]
    return list(processed)
