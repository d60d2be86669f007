"""The checkpoint layout on disk, written atomically.

    {checkpoint_root}/{project}/{name}/checkpoints/{step:04d}/
        adapter_config.json          peft's standard layout: vLLM and peft load the
        adapter_model.safetensors    folder as it is
        optimizer.pt                 AdamW state, so a restarted trainer resumes exactly
        trainq.json                  step, job_id, base_model, created_at, metrics, train_s

A step is written into ``.tmp-t{token}-{step}-{random}`` beside its final folder,
fsynced, then renamed into place: a reader (the inference worker, a restarted
trainer) sees a complete checkpoint or none. ``token`` is the writer's fencing
token (``Writer``): the worker checks it still holds it just before the rename,
and a write removes the temporary folders of writers with a token up to its own
(crashed or fenced-out writes), never those of a newer writer. Step folders are
the only names made of digits, so nothing else is mistaken for a step.

Which steps count is not decided here: the worker commits a step in Redis after
the rename, and a folder beyond the committed step is a leftover of a write that
was never committed (``set_aside`` removes one that another job wrote).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.names import validate_name
from producer.types import JobOutcome

__all__ = [
    "METADATA_FILE",
    "OPTIMIZER_FILE",
    "CheckpointInfo",
    "Writer",
    "checkpoint_dir",
    "delete_steps",
    "latest_step",
    "list_steps",
    "model_dir",
    "read_info",
    "read_info_if_any",
    "set_aside",
    "write_checkpoint",
]

METADATA_FILE = "trainq.json"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_RE = re.compile(r"\d{4,}")
_TMP_PREFIX = ".tmp-"
_TMP_TOKEN_RE = re.compile(r"\.tmp-t(\d+)-")


def _unfenced() -> None:
    """Writing without a fencing token: nothing to check (a trainer used in process, tests, benchmarks)."""


@dataclass(frozen=True)
class Writer:
    """Who writes a step: the fencing token it holds, its name, and a check that the token is still current.

    ``fence()`` raises when another writer took over; it runs just before a step
    is renamed into place and before steps are deleted.
    """

    token: int = 0
    name: str = ""
    fence: Callable[[], None] = field(default=_unfenced, compare=False)

    def temporary_name(self, what: str) -> str:
        return f"{_TMP_PREFIX}t{self.token}-{what}-{uuid.uuid4().hex[:8]}"


UNFENCED = Writer()


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``trainq.json`` records about one step."""

    step: int
    job_id: str
    base_model: str
    created_at: float
    metrics: dict[str, float]
    train_s: float
    path: Path

    def outcome(self) -> JobOutcome:
        return JobOutcome(step=self.step, metrics=dict(self.metrics), checkpoint_path=str(self.path), train_s=self.train_s)


def model_dir(root: str | Path, project: str, name: str) -> Path:
    """``{root}/{project}/{name}/checkpoints``, refusing names that could leave ``root``."""
    validate_name(project, "project")
    validate_name(name, "model name")
    base = Path(root).resolve()
    path = (base / project / name / "checkpoints").resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"checkpoint folder {path} is outside the checkpoint root {base}")
    return path


def checkpoint_dir(root: str | Path, project: str, name: str, step: int) -> Path:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return model_dir(root, project, name) / f"{step:04d}"


def list_steps(root: str | Path, project: str, name: str) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    folder = model_dir(root, project, name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if _STEP_RE.fullmatch(p.name) and (p / METADATA_FILE).is_file())


def latest_step(root: str | Path, project: str, name: str) -> int | None:
    steps = list_steps(root, project, name)
    return steps[-1] if steps else None


def read_info(root: str | Path, project: str, name: str, step: int) -> CheckpointInfo:
    path = checkpoint_dir(root, project, name, step)
    data = json.loads((path / METADATA_FILE).read_text())
    return CheckpointInfo(
        step=int(data["step"]),
        job_id=str(data.get("job_id", "")),
        base_model=str(data.get("base_model", "")),
        created_at=float(data.get("created_at", 0.0)),
        metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
        train_s=float(data.get("train_s", 0.0)),
        path=path,
    )


def read_info_if_any(root: str | Path, project: str, name: str, step: int) -> CheckpointInfo | None:
    """Step ``step``'s ``trainq.json``, or ``None`` if that step has no complete checkpoint."""
    if not (checkpoint_dir(root, project, name, step) / METADATA_FILE).is_file():
        return None
    return read_info(root, project, name, step)


def write_checkpoint(
    root: str | Path,
    project: str,
    name: str,
    step: int,
    write_files: Callable[[Path], None],
    metadata: dict[str, Any],
    writer: Writer = UNFENCED,
) -> Path:
    """Create step ``step``'s folder atomically and return its path.

    ``write_files(folder)`` writes the adapter and optimizer files into the
    temporary folder; ``trainq.json`` (``metadata`` plus ``step``, ``created_at``,
    the writer's ``token`` and name as ``worker``) is written last. An existing
    step is never overwritten (``FileExistsError``); ``writer.fence()`` runs just
    before the rename and its error leaves nothing behind.
    """
    final = checkpoint_dir(root, project, name, step)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent, writer.token)
    tmp = final.parent / writer.temporary_name(f"{step:04d}")
    tmp.mkdir()
    try:
        write_files(tmp)
        record = {**metadata, "step": step, "created_at": metadata.get("created_at", time.time()),
                  "token": writer.token, "worker": writer.name}
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        _fsync_tree(tmp)
        writer.fence()
        # rename() would silently replace an empty folder that appeared meanwhile; refuse instead.
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists")
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def delete_steps(
    root: str | Path, project: str, name: str, steps: list[int], *, latest: int | None = None,
    writer: Writer = UNFENCED,
) -> list[int]:
    """Delete these steps' folders, never ``latest`` (the committed step) or any beyond it; return those deleted.

    ``latest`` defaults to the newest step on disk. A step is renamed to a
    temporary name first, so it vanishes from listings at once.
    """
    existing = list_steps(root, project, name)
    if not existing:
        return []
    latest = existing[-1] if latest is None else latest
    doomed = sorted(set(steps) & {step for step in existing if step < latest})
    if doomed:
        writer.fence()
    for step in doomed:
        _remove(checkpoint_dir(root, project, name, step), writer, "deleted")
    return doomed


def set_aside(root: str | Path, project: str, name: str, step: int, writer: Writer) -> None:
    """Remove an uncommitted step's folder (another job's write that never became a step)."""
    writer.fence()
    _remove(checkpoint_dir(root, project, name, step), writer, "aside")


def _remove(path: Path, writer: Writer, why: str) -> None:
    doomed = path.parent / writer.temporary_name(f"{why}-{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_temporaries(folder: Path, token: int) -> None:
    # A temporary folder of a writer with a token up to ours is a crashed write (ours or an
    # older leader's); a newer token's belongs to the writer that fenced us out: not ours to touch.
    for child in folder.iterdir():
        if not child.name.startswith(_TMP_PREFIX):
            continue
        owner = _TMP_TOKEN_RE.match(child.name)
        if owner is None or int(owner.group(1)) <= token:
            shutil.rmtree(child, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
