"""gather_trajectory_groups: concurrency, order, the exception budget, after_each."""

from __future__ import annotations

import asyncio
import time

import pytest

from producer.gather import gather_trajectory_groups
from producer.types import Trajectory, TrajectoryGroup


async def rollout(reward: float, delay: float = 0.0) -> Trajectory:
    await asyncio.sleep(delay)
    return Trajectory([{"role": "user", "content": "hi"}], reward=reward)


async def failing(message: str = "boom", delay: float = 0.0) -> Trajectory:
    await asyncio.sleep(delay)
    raise RuntimeError(message)


def rewards(groups: list[TrajectoryGroup]) -> list[list[float]]:
    return [[t.reward for t in g.trajectories] for g in groups]


async def test_groups_come_back_in_input_order_with_rollouts_in_order() -> None:
    groups = await gather_trajectory_groups(
        [[rollout(1.0, 0.03), rollout(2.0, 0.0)], [rollout(3.0, 0.01)]], pbar_desc=None
    )

    assert rewards(groups) == [[1.0, 2.0], [3.0]]


async def test_every_rollout_runs_concurrently() -> None:
    started = time.monotonic()
    await gather_trajectory_groups([[rollout(0.0, 0.2) for _ in range(5)] for _ in range(4)], pbar_desc=None)

    assert time.monotonic() - started < 0.6  # 20 rollouts of 0.2 s each, not 4 s


async def test_a_whole_group_awaitable_is_accepted() -> None:
    async def make_group() -> TrajectoryGroup:
        return TrajectoryGroup([await rollout(0.5), await rollout(1.0)], metadata={"scenario": 7})

    [group] = await gather_trajectory_groups([make_group()], pbar_desc=None)

    assert rewards([group]) == [[0.5, 1.0]] and group.metadata == {"scenario": 7}


async def test_by_default_an_exception_is_re_raised_and_the_rest_cancelled() -> None:
    cancelled = asyncio.Event()

    async def slow() -> Trajectory:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("not reached")

    with pytest.raises(RuntimeError, match="boom"):
        await gather_trajectory_groups([[slow(), failing()]], pbar_desc=None)
    assert cancelled.is_set()


async def test_exceptions_within_the_budget_are_recorded_in_their_group() -> None:
    groups = await gather_trajectory_groups(
        [[rollout(1.0), failing("first")], [failing("second"), rollout(0.0)]],
        pbar_desc=None,
        max_exceptions=2,
    )

    assert rewards(groups) == [[1.0], [0.0]]
    assert [[(e.type, e.message) for e in g.exceptions] for g in groups] == [
        [("RuntimeError", "first")], [("RuntimeError", "second")],
    ]
    assert "RuntimeError: first" in groups[0].exceptions[0].traceback


async def test_a_fractional_budget_is_a_share_of_all_rollouts() -> None:
    specs = lambda: [[rollout(1.0) for _ in range(7)] + [failing(), failing(), failing()]]  # noqa: E731

    # 0.2 of 10 rollouts allows 2 exceptions: the third raises.
    with pytest.raises(RuntimeError):
        await gather_trajectory_groups(specs(), pbar_desc=None, max_exceptions=0.2)
    [group] = await gather_trajectory_groups(specs(), pbar_desc=None, max_exceptions=0.3)
    assert len(group.trajectories) == 7 and len(group.exceptions) == 3


async def test_a_group_whose_every_rollout_failed_is_left_out() -> None:
    groups = await gather_trajectory_groups(
        [[failing(), failing()], [rollout(1.0)]], pbar_desc=None, max_exceptions=2
    )

    assert rewards(groups) == [[1.0]]


async def test_after_each_can_keep_replace_split_or_drop_groups() -> None:
    seen: list[int] = []

    async def after_each(group: TrajectoryGroup) -> TrajectoryGroup | list[TrajectoryGroup] | None:
        n = len(group.trajectories)
        seen.append(n)
        if n == 1:
            return None  # keep as it is
        if n == 2:
            return [TrajectoryGroup([t]) for t in group.trajectories]  # split
        if n == 3:
            return []  # drop
        return TrajectoryGroup(group.trajectories[:1])  # replace

    groups = await gather_trajectory_groups(
        [[rollout(1.0)], [rollout(2.0), rollout(3.0)], [rollout(4.0) for _ in range(3)],
         [rollout(5.0) for _ in range(4)]],
        pbar_desc=None,
        after_each=after_each,
    )

    assert sorted(seen) == [1, 2, 3, 4]
    assert rewards(groups) == [[1.0], [2.0], [3.0], [5.0]]


async def test_progress_bar_shows_the_running_reward(capsys: pytest.CaptureFixture[str]) -> None:
    await gather_trajectory_groups([[rollout(1.0), rollout(0.0)]], pbar_desc="train")

    err = capsys.readouterr().err
    assert "train" in err and "2/2" in err and "reward=0.500" in err


async def test_items_of_the_wrong_kind_are_a_type_error_before_anything_runs() -> None:
    with pytest.raises(TypeError, match="awaitables of Trajectory"):
        await gather_trajectory_groups([[Trajectory([], reward=1.0)]], pbar_desc=None)
    with pytest.raises(TypeError, match="awaitable of TrajectoryGroup"):
        await gather_trajectory_groups([42], pbar_desc=None)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="max_exceptions"):
        await gather_trajectory_groups([], pbar_desc=None, max_exceptions=-1)


async def test_a_bad_item_closes_the_rollouts_already_created() -> None:
    # Otherwise Python warns "coroutine was never awaited" (an error under this suite's settings).
    with pytest.raises(TypeError):
        await gather_trajectory_groups([[rollout(1.0)], [rollout(2.0)], "oops"], pbar_desc=None)  # type: ignore[list-item]
