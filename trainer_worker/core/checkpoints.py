"""The checkpoint layout on disk, written atomically.

    {checkpoint_root}/{project}/{name}/checkpoints/{step:04d}/
        adapter_config.json          peft's standard layout: vLLM and peft load the
        adapter_model.safetensors    folder as it is
        optimizer.pt                 AdamW state, so a restarted trainer resumes exactly
        trainq.json                  step, job_id, base_model, created_at, metrics, train_s

A step is written into ``.tmp-{step}-{random}`` beside its final folder, fsynced,
then renamed into place: a reader (the inference worker, a restarted trainer)
sees a complete checkpoint or none. Leftover temporary folders of a crashed
write are removed by the next write. Step folders are the only names made of
digits, so nothing else is mistaken for a step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.names import validate_name
from producer.types import JobOutcome

__all__ = [
    "CheckpointInfo",
    "METADATA_FILE",
    "OPTIMIZER_FILE",
    "checkpoint_dir",
    "delete_steps",
    "find_job",
    "latest_step",
    "list_steps",
    "model_dir",
    "read_info",
    "write_checkpoint",
]

METADATA_FILE = "trainq.json"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_RE = re.compile(r"\d{4,}")
_TMP_PREFIX = ".tmp-"


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


def find_job(root: str | Path, project: str, name: str, job_id: str) -> CheckpointInfo | None:
    """The checkpoint a job made, if any (newest first: a redelivered job is usually the last)."""
    if not job_id:
        return None
    for step in reversed(list_steps(root, project, name)):
        info = read_info(root, project, name, step)
        if info.job_id == job_id:
            return info
    return None


def write_checkpoint(
    root: str | Path,
    project: str,
    name: str,
    step: int,
    write_files: Callable[[Path], None],
    metadata: dict[str, Any],
) -> Path:
    """Create step ``step``'s folder atomically and return its path.

    ``write_files(folder)`` writes the adapter and optimizer files into the
    temporary folder; ``trainq.json`` (``metadata`` plus ``step`` and
    ``created_at``) is written last. An existing step is never overwritten.
    """
    final = checkpoint_dir(root, project, name, step)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)
    tmp = final.parent / f"{_TMP_PREFIX}{step:04d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_files(tmp)
        record = {**metadata, "step": step, "created_at": metadata.get("created_at", time.time())}
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        _fsync_tree(tmp)
        # rename() would silently replace an empty folder that appeared meanwhile; refuse instead.
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists")
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def delete_steps(root: str | Path, project: str, name: str, steps: list[int]) -> list[int]:
    """Delete these steps' folders (never the latest one); return the steps deleted.

    A step is renamed to a temporary name first, so it vanishes from listings at once.
    """
    existing = list_steps(root, project, name)
    if not existing:
        return []
    deleted = []
    for step in sorted(set(steps) & set(existing[:-1])):
        path = checkpoint_dir(root, project, name, step)
        doomed = path.parent / f"{_TMP_PREFIX}deleted-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(step)
    return deleted


def _remove_stale_temporaries(folder: Path) -> None:
    # One trainer writes a model's steps at a time, so any temporary folder is a crashed write.
    for child in folder.iterdir():
        if child.name.startswith(_TMP_PREFIX):
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
