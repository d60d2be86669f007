"""What ``model.log`` writes: readable trajectories per step and one metrics line per call.

Layout under a model's folder (``{base_path}/{project}/models/{name}``)::

    history.jsonl                       one JSON object per ``log`` call:
                                        {"step": 3, "recorded_at": "...Z", "train/reward": 0.8, ...}
    trajectories/{split}/{step:04d}.jsonl
                                        one JSON object per trajectory (and per recorded exception)

Trajectory lines hold what a person wants to read (messages, the sampled text,
token counts, reward, metrics), not the token id and logprob arrays: those are
in the train job's payload and would make the files unreadable and large.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from producer.types import (
    Choice,
    ExceptionInfo,
    Trajectory,
    TrajectoryGroup,
    as_float_metrics,
    as_messages_and_choices,
    choice_as_message,
)

__all__ = ["HISTORY_FILE", "aggregate_metrics", "read_history", "trajectories_path", "write_log"]

HISTORY_FILE = "history.jsonl"

_json = msgspec.json.Encoder()


def trajectories_path(model_dir: Path, split: str, step: int) -> Path:
    """``{model_dir}/trajectories/{split}/{step:04d}.jsonl``."""
    return Path(model_dir) / "trajectories" / split / f"{step:04d}.jsonl"


def write_log(
    model_dir: Path,
    groups: Iterable[TrajectoryGroup | Trajectory | BaseException] | None,
    *,
    split: str,
    step: int,
    metrics: Mapping[str, float] | None,
) -> dict[str, float]:
    """Record one ``model.log`` call; return the metrics written, without the split prefix.

    Parameters:
        model_dir: the model's folder; created if missing.
        groups: the trajectory groups to write and aggregate. Bare ``Trajectory``
            items are gathered into one group. ``None`` writes metrics only.
        split: ``"train"``, ``"val"``, ...; names the trajectories folder and prefixes
            every metric in ``history.jsonl`` (``train/reward``).
        step: the model step these belong to; names the trajectories file.
        metrics: extra metrics (e.g. a train result's); they override aggregates
            of the same name.

    Non-finite values (NaN, inf) are dropped rather than written, so a history
    line is always valid JSON and plots never see a hole filled with ``null``.
    """
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"split must be a plain folder name, got {split!r}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    model_dir = Path(model_dir)
    group_list = _as_groups(groups)

    values: dict[str, float] = {}
    if group_list is not None:
        values.update(aggregate_metrics(group_list))
        _write_trajectories(trajectories_path(model_dir, split, step), group_list)
    for key, value in (metrics or {}).items():
        values[key] = _as_float(key, value)
    values = {key: value for key, value in values.items() if math.isfinite(value)}

    record: dict[str, Any] = {"step": step, "recorded_at": _utc_now()}
    record.update({f"{split}/{key}": value for key, value in values.items()})
    model_dir.mkdir(parents=True, exist_ok=True)
    # One write() of one line in append mode: concurrent loggers interleave whole lines.
    with open(model_dir / HISTORY_FILE, "ab") as history:
        history.write(_json.encode(record) + b"\n")
    return values


def aggregate_metrics(groups: list[TrajectoryGroup]) -> dict[str, float]:
    """Mean ``reward``, ``reward_std_dev``, ``exception_rate`` and the mean of each trajectory metric.

    ``reward_std_dev`` is the mean over groups of the population standard
    deviation of rewards within the group: the spread that group-relative
    advantages can learn from (0 means no group had a signal).
    ``exception_rate`` is exceptions / (exceptions + trajectories).
    A trajectory metric is averaged over the trajectories that report it.
    """
    rewards = [t.reward for g in groups for t in g.trajectories]
    n_exceptions = sum(len(g.exceptions) for g in groups)
    out: dict[str, float] = {}
    if rewards:
        out["reward"] = sum(rewards) / len(rewards)
    stds = [_population_std([t.reward for t in g.trajectories]) for g in groups if g.trajectories]
    if stds:
        out["reward_std_dev"] = sum(stds) / len(stds)
    if rewards or n_exceptions:
        out["exception_rate"] = n_exceptions / (n_exceptions + len(rewards))

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for group in groups:
        for trajectory in group.trajectories:
            for key, value in trajectory.metrics.items():
                value = _as_float(key, value)
                if not math.isfinite(value):
                    continue
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
    for key, total in sums.items():
        # Built-in aggregates win: a trajectory metric called "reward" must not hide the real one.
        out.setdefault(key, total / counts[key])
    return out


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``history.jsonl``, oldest first; ``path`` is the model folder or the file.

    A missing file is an empty history. A torn last line (a crash mid-write) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            record = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ------------------------------------------------------------------------ helpers


def _as_groups(items: Iterable[TrajectoryGroup | Trajectory | BaseException] | None) -> list[TrajectoryGroup] | None:
    """Groups as given; loose trajectories (and exceptions, as ART passes them) gathered into one group."""
    if items is None:
        return None
    groups: list[TrajectoryGroup] = []
    loose: list[Trajectory] = []
    errors: list[ExceptionInfo] = []
    for item in items:
        if isinstance(item, TrajectoryGroup):
            groups.append(item)
        elif isinstance(item, Trajectory):
            loose.append(item)
        elif isinstance(item, BaseException):
            errors.append(ExceptionInfo.from_exception(item))
        else:
            raise TypeError(f"expected TrajectoryGroup, Trajectory or exception items, got {type(item).__name__}")
    if loose or errors:
        groups.append(TrajectoryGroup(loose, exceptions=errors))
    for group in groups:
        if group.pending:
            raise TypeError("a TrajectoryGroup with rollouts still pending cannot be logged: await it first")
    return groups


def _as_float(key: str, value: object) -> float:
    """A metric's value as a float: ints and bools count (ART's ``metrics["win"] = True``), nothing else."""
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def _population_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _write_trajectories(path: Path, groups: list[TrajectoryGroup]) -> None:
    """Write the step's file atomically: a reader never sees half of it, a re-log replaces it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for g, group in enumerate(groups):
                for t, trajectory in enumerate(group.trajectories):
                    out.write(_json.encode(_trajectory_record(g, t, group, trajectory)) + b"\n")
                for exception in group.exceptions:
                    out.write(_json.encode({"group": g, "exception": exception}) + b"\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _trajectory_record(g: int, t: int, group: TrajectoryGroup, trajectory: Trajectory) -> dict[str, Any]:
    record: dict[str, Any] = {
        "group": g,
        "index": t,
        "reward": trajectory.reward if math.isfinite(trajectory.reward) else None,
        "metrics": {k: v for k, v in as_float_metrics(trajectory.metrics).items() if _finite_number(v)},
        "messages": [_readable(item) for item in as_messages_and_choices(trajectory.messages_and_choices)],
    }
    sampled_step = group.effective_sampled_step()
    if sampled_step is not None:
        record["sampled_step"] = sampled_step
    for field in ("metadata", "tools", "logs"):
        value = getattr(trajectory, field)
        if value:
            record[field] = value
    return record


def _readable(item: dict[str, Any] | Choice | Any) -> dict[str, Any]:
    """A message as a person reads it; a sampled turn with its token count, finish reason and mean logprob."""
    if isinstance(item, dict):
        return item
    message = choice_as_message(item)  # a Choice, or an openai choice that carried no token ids
    if not isinstance(item, Choice):
        return message
    message["num_tokens"] = len(item.token_ids)
    if item.finish_reason is not None:
        message["finish_reason"] = item.finish_reason
    if item.logprobs:
        message["logprob_mean"] = sum(item.logprobs) / len(item.logprobs)
    return message


def _finite_number(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)
