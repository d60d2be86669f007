"""model.log's files: trajectories per step, one history line per call, exact aggregates."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import pytest

from producer.history import read_history, trajectories_path, write_log
from producer.types import Choice, ChoiceMessage, ExceptionInfo, Trajectory, TrajectoryGroup


def traj(reward: float, **metrics: float) -> Trajectory:
    return Trajectory(
        [
            {"role": "user", "content": "yes, no or maybe?"},
            Choice(
                token_ids=[10, 11, 12],
                logprobs=[-0.5, -0.25, -0.75],
                message=ChoiceMessage(content="yes"),
                finish_reason="stop",
                sampled_step=2,
            ),
        ],
        reward=reward,
        metrics=metrics,
    )


def two_groups() -> list[TrajectoryGroup]:
    # group 0 rewards 1, 0 -> std 0.5; group 1 rewards 0.5, 0.5, 0.5 -> std 0; one exception
    return [
        TrajectoryGroup([traj(1.0, length=3.0), traj(0.0, length=5.0)]),
        TrajectoryGroup(
            [traj(0.5, length=1.0, hit=1.0), traj(0.5), traj(0.5, length=3.0)],
            exceptions=[ExceptionInfo(type="TimeoutError", message="slow")],
        ),
    ]


def test_aggregates_are_exact(tmp_path: Path) -> None:
    values = write_log(tmp_path, two_groups(), split="train", step=3, metrics=None)

    assert values == {
        "reward": pytest.approx(2.5 / 5),
        "reward_std_dev": pytest.approx((0.5 + 0.0) / 2),
        "exception_rate": pytest.approx(1 / 6),
        "length": pytest.approx((3 + 5 + 1 + 3) / 4),
        "hit": pytest.approx(1.0),
    }


def test_history_line_prefixes_every_metric_with_the_split(tmp_path: Path) -> None:
    write_log(tmp_path, two_groups(), split="train", step=3, metrics={"loss": 0.25})

    [record] = read_history(tmp_path)
    assert record["step"] == 3
    assert datetime.fromisoformat(record["recorded_at"]).utcoffset().total_seconds() == 0
    assert record["train/reward"] == pytest.approx(0.5)
    assert record["train/loss"] == 0.25
    assert {k for k in record if "/" in k} == {
        "train/reward", "train/reward_std_dev", "train/exception_rate", "train/length", "train/hit", "train/loss",
    }


def test_passed_metrics_override_aggregates_and_non_finite_values_are_dropped(tmp_path: Path) -> None:
    values = write_log(
        tmp_path,
        [TrajectoryGroup([traj(1.0, length=math.nan), traj(0.0, length=4.0)])],
        split="val",
        step=0,
        metrics={"reward": 0.75, "loss": math.nan, "grad_norm": math.inf},
    )

    assert values["reward"] == 0.75
    assert values["length"] == 4.0  # the NaN trajectory metric is not averaged in
    assert "loss" not in values and "grad_norm" not in values
    [record] = read_history(tmp_path / "history.jsonl")
    assert record["val/reward"] == 0.75 and "val/loss" not in record


def test_metrics_only_call_writes_no_trajectory_file(tmp_path: Path) -> None:
    write_log(tmp_path, None, split="train", step=1, metrics={"loss": 1.5})

    assert not (tmp_path / "trajectories").exists()
    assert read_history(tmp_path)[0]["train/loss"] == 1.5


def test_history_appends_in_order(tmp_path: Path) -> None:
    for step in range(3):
        write_log(tmp_path, None, split="train", step=step, metrics={"loss": float(step)})
    write_log(tmp_path, None, split="val", step=2, metrics={"reward": 0.5})

    assert [(r["step"], sorted(k for k in r if "/" in k)) for r in read_history(tmp_path)] == [
        (0, ["train/loss"]), (1, ["train/loss"]), (2, ["train/loss"]), (2, ["val/reward"]),
    ]


def test_trajectory_file_is_readable_text_not_token_arrays(tmp_path: Path) -> None:
    write_log(tmp_path, two_groups(), split="train", step=7, metrics=None)

    path = trajectories_path(tmp_path, "train", 7)
    assert path == tmp_path / "trajectories" / "train" / "0007.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6  # five trajectories and one exception
    first = lines[0]
    assert (first["group"], first["index"], first["reward"], first["sampled_step"]) == (0, 0, 1.0, 2)
    assert first["metrics"] == {"length": 3.0}
    assert first["messages"] == [
        {"role": "user", "content": "yes, no or maybe?"},
        {"role": "assistant", "content": "yes", "num_tokens": 3, "finish_reason": "stop", "logprob_mean": -0.5},
    ]
    assert lines[-1] == {"group": 1, "exception": {"type": "TimeoutError", "message": "slow"}}
    assert "token_ids" not in path.read_text()


def test_relogging_a_step_replaces_its_trajectory_file(tmp_path: Path) -> None:
    write_log(tmp_path, two_groups(), split="val", step=1, metrics=None)
    write_log(tmp_path, [traj(0.25)], split="val", step=1, metrics=None)

    lines = trajectories_path(tmp_path, "val", 1).read_text().splitlines()
    assert [json.loads(line)["reward"] for line in lines] == [0.25]
    assert [p.name for p in (tmp_path / "trajectories" / "val").iterdir()] == ["0001.jsonl"]


def test_bare_trajectories_form_one_group(tmp_path: Path) -> None:
    values = write_log(tmp_path, [traj(1.0), traj(0.0)], split="val", step=0, metrics=None)

    assert values["reward_std_dev"] == pytest.approx(0.5)


def test_read_history_skips_a_torn_last_line(tmp_path: Path) -> None:
    write_log(tmp_path, None, split="train", step=0, metrics={"loss": 1.0})
    with open(tmp_path / "history.jsonl", "a") as history:
        history.write('{"step": 1, "train/lo')

    assert [r["step"] for r in read_history(tmp_path)] == [0]
    assert read_history(tmp_path / "missing") == []


@pytest.mark.parametrize("split", ["", "a/b", ".hidden"])
def test_bad_split_is_rejected_before_writing(tmp_path: Path, split: str) -> None:
    with pytest.raises(ValueError, match="split"):
        write_log(tmp_path, None, split=split, step=0, metrics=None)
    assert not (tmp_path / "history.jsonl").exists()


def test_non_numeric_metric_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'note'"):
        write_log(tmp_path, None, split="train", step=0, metrics={"note": "hi"})  # type: ignore[dict-item]
