"""Run many rollouts concurrently and collect them into trajectory groups, as ART's helpers do.

    groups = await gather_trajectory_groups(
        [TrajectoryGroup(rollout(model, scenario) for _ in range(8)) for scenario in scenarios],
        pbar_desc="train",
        max_exceptions=0.1,
    )

Each item is one group: a ``TrajectoryGroup`` whose rollouts are still to be
awaited (ART's form), an iterable of awaitables of ``Trajectory``, or an
awaitable of a whole ``TrajectoryGroup``. Every rollout of every group runs at
the same time: the inference server batches them, which is where the
throughput comes from.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from producer.types import ExceptionInfo, Trajectory, TrajectoryGroup

__all__ = ["gather_trajectories", "gather_trajectory_groups", "resolve_group"]

AfterEach = Callable[
    [TrajectoryGroup],
    "TrajectoryGroup | list[TrajectoryGroup] | None | Awaitable[TrajectoryGroup | list[TrajectoryGroup] | None]",
]


class _Failed:
    """A rollout's exception, kept because it was within ``max_exceptions``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.info = ExceptionInfo.from_exception(exc)


@dataclass
class _Spec:
    """One group to gather: its rollouts (or one awaitable of the whole group), and the group to fill, if given."""

    rollouts: list[Awaitable[Any]]
    whole_group: bool = False
    template: TrajectoryGroup | None = None

    def close(self) -> None:
        """Close the coroutines never awaited, so none is left "never awaited"."""
        for awaitable in self.rollouts:
            if inspect.iscoroutine(awaitable):
                awaitable.close()


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
    groups: Iterable[Any],
    *,
    pbar_desc: str | None = "gather",
    max_exceptions: int | float = 0,
    after_each: AfterEach | None = None,
    pbar_total_completion_tokens: bool = False,
    max_metrics: int | None = None,
) -> list[TrajectoryGroup]:
    """Run every rollout concurrently; return the groups in the order given.

    Parameters:
        groups: items that are each a ``TrajectoryGroup`` of pending rollouts,
            an iterable of awaitables of ``Trajectory`` (one group), or an
            awaitable of a ``TrajectoryGroup``.
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
        pbar_total_completion_tokens, max_metrics: ART's progress-bar options;
            accepted, without effect here.

    A group left with no trajectory (every rollout raised) is left out of the
    result: a group must hold at least one trajectory to be trained on.
    """
    specs = _as_specs(groups)
    finished = await _run(specs, pbar_desc, max_exceptions, lambda spec, results: _finish_group(spec, results, after_each))
    return [group for produced in finished for group in produced if group.trajectories]


async def gather_trajectories(
    trajectories: Iterable[Awaitable[Any]],
    *,
    pbar_desc: str | None = "gather",
    max_exceptions: int | float = 0,
    pbar_total_completion_tokens: bool = False,
) -> list[Any]:
    """Run rollouts concurrently; return their results in the order given (ART's helper).

    Each awaitable gives a ``Trajectory`` or an iterable of them (then a list
    comes back in its place). With ``max_exceptions`` > 0 a rollout that
    raised within the budget is returned as its exception.
    """
    specs = [_Spec([awaitable]) for awaitable in _as_awaitables(list(trajectories), "trajectories")]

    async def unwrap(_spec: _Spec, results: list[Any]) -> Any:
        result = results[0]
        return result.exc if isinstance(result, _Failed) else result

    return await _run(specs, pbar_desc, max_exceptions, unwrap)


async def resolve_group(group: TrajectoryGroup) -> TrajectoryGroup:
    """Run a group's pending rollouts concurrently, in place; the first exception is raised, the rest cancelled."""
    if not group.pending:
        return group
    [filled] = await _run([_group_spec(group)], None, 0, lambda spec, results: _finish_group(spec, results, None))
    group.trajectories, group.exceptions = filled[0].trajectories, filled[0].exceptions
    return group


# ------------------------------------------------------------------ running


async def _run(
    specs: list[_Spec],
    pbar_desc: str | None,
    max_exceptions: int | float,
    finish: Callable[[_Spec, list[Any]], Awaitable[Any]],
) -> list[Any]:
    """Start every rollout of every spec now; ``finish`` each spec's results as they complete; keep order."""
    total = sum(len(spec.rollouts) for spec in specs)
    progress = _Progress(pbar_desc, total, _exception_budget(max_exceptions, total))
    rollout_tasks: list[asyncio.Future[Any]] = []
    spec_tasks: list[asyncio.Future[Any]] = []
    for spec in specs:
        run_one = _group_rollout if spec.whole_group else _rollout
        tasks = [asyncio.ensure_future(run_one(awaitable, progress)) for awaitable in spec.rollouts]
        rollout_tasks.extend(tasks)
        spec_tasks.append(asyncio.ensure_future(_finish_spec(spec, tasks, finish)))
    try:
        return await asyncio.gather(*spec_tasks)
    except BaseException:
        # A rollout went past the budget (or we were cancelled): stop the rest
        # rather than leave them sampling into the void.
        for task in (*rollout_tasks, *spec_tasks):
            task.cancel()
        await asyncio.gather(*rollout_tasks, *spec_tasks, return_exceptions=True)
        raise
    finally:
        progress.close()


async def _finish_spec(
    spec: _Spec, tasks: Sequence[asyncio.Future[Any]], finish: Callable[[_Spec, list[Any]], Awaitable[Any]]
) -> Any:
    return await finish(spec, list(await asyncio.gather(*tasks)))


async def _rollout(awaitable: Awaitable[Any], progress: _Progress) -> Any:
    try:
        result = await awaitable
    except Exception as exc:  # noqa: BLE001 - the budget decides whether it propagates
        return progress.failed(exc)
    trajectories = [result] if isinstance(result, Trajectory) else _trajectory_list(result)
    progress.done(trajectories)
    return result


async def _group_rollout(awaitable: Awaitable[TrajectoryGroup], progress: _Progress) -> TrajectoryGroup | _Failed:
    try:
        group = await awaitable
    except Exception as exc:  # noqa: BLE001
        return progress.failed(exc)
    if not isinstance(group, TrajectoryGroup):
        raise TypeError(f"a group rollout returned {type(group).__name__}, expected TrajectoryGroup")
    progress.done(group.trajectories, expected=1)
    return group


def _trajectory_list(result: Any) -> list[Trajectory]:
    if isinstance(result, Iterable) and not isinstance(result, (str, bytes, dict)):
        items = list(result)
        if all(isinstance(item, Trajectory) for item in items):
            return items
    raise TypeError(f"a rollout returned {type(result).__name__}, expected Trajectory")


async def _finish_group(spec: _Spec, results: list[Any], after_each: AfterEach | None) -> list[TrajectoryGroup]:
    if spec.whole_group:
        group = results[0] if isinstance(results[0], TrajectoryGroup) else TrajectoryGroup(
            [], exceptions=[results[0].info]
        )
    else:
        trajectories = [t for r in results if not isinstance(r, _Failed) for t in _as_trajectories(r)]
        exceptions = [r.info for r in results if isinstance(r, _Failed)]
        template = spec.template
        if template is None:
            group = TrajectoryGroup(trajectories, exceptions=exceptions)
        else:
            group = TrajectoryGroup(trajectories, exceptions=[*template.exceptions, *exceptions],
                                    metadata=template.metadata, sampled_step=template.sampled_step)
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


def _as_trajectories(result: Any) -> list[Trajectory]:
    return [result] if isinstance(result, Trajectory) else list(result)


# ---------------------------------------------------------------- the input


def _as_specs(items: Iterable[object]) -> list[_Spec]:
    specs: list[_Spec] = []
    try:
        for item in items:
            specs.append(_as_spec(item))
    except (TypeError, ValueError):
        for spec in specs:
            spec.close()
        raise
    return specs


def _as_spec(item: object) -> _Spec:
    if isinstance(item, TrajectoryGroup):
        if item.pending:
            return _group_spec(item)
        return _Spec([_ready(item)], whole_group=True)
    # Awaitable first: an asyncio.Future is also iterable, but means one group result.
    if inspect.isawaitable(item):
        return _Spec([item], whole_group=True)
    if isinstance(item, Iterable) and not isinstance(item, (str, bytes, Trajectory)):
        return _Spec(_as_awaitables(list(item), "a group's rollouts"))
    raise TypeError(
        "each item must be a TrajectoryGroup, an iterable of awaitables of Trajectory, "
        f"or an awaitable of TrajectoryGroup, got {type(item).__name__}"
    )


def _group_spec(group: TrajectoryGroup) -> _Spec:
    """A group built from rollouts still to run: its rollouts are gathered like a list's, into a copy of it."""
    done = [t for t in group.trajectories if isinstance(t, Trajectory)]
    return _Spec([*(_ready(t) for t in done), *group.pending], template=group)


async def _ready(value: Any) -> Any:
    return value


def _as_awaitables(items: list[Any], what: str) -> list[Awaitable[Any]]:
    for item in items:
        if not inspect.isawaitable(item):
            _Spec(items).close()
            raise TypeError(f"{what} must be awaitables of Trajectory, got {type(item).__name__}")
    return items


def _exception_budget(max_exceptions: int | float, total: int) -> int:
    if isinstance(max_exceptions, bool) or max_exceptions < 0:
        raise ValueError(f"max_exceptions must be an int >= 0 or a fraction in [0, 1), got {max_exceptions!r}")
    if isinstance(max_exceptions, float) and max_exceptions < 1:
        return int(max_exceptions * total)
    return int(max_exceptions)
