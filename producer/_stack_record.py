"""``stack.json``: what a running local stack records about itself, so that other processes find and reuse it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import msgspec

from producer.defaults import DEFAULT_PATH

__all__ = ["STACK_FILE", "StackInfo", "forget_stack", "read_stack", "write_stack"]

STACK_FILE = "stack.json"


class StackInfo(msgspec.Struct, kw_only=True):
    """What ``stack.json`` records about a running local stack."""

    base_model: str
    redis_url: str
    inference_base_url: str
    api_key: str
    trainer_hostname: str
    owner_pid: int
    started_at: float
    pids: dict[str, int] = msgspec.field(default_factory=dict)
    """Processes this stack started: ``redis``, ``trainer``, ``inference`` (absent when reused or external)."""
    metrics_ports: dict[str, int] = msgspec.field(default_factory=dict)
    logs: dict[str, str] = msgspec.field(default_factory=dict)


def read_stack(path: str | os.PathLike[str] = DEFAULT_PATH) -> StackInfo | None:
    """The stack recorded under ``path``, or ``None`` (no file, or an unreadable one)."""
    try:
        return msgspec.json.decode(Path(path, STACK_FILE).read_bytes(), type=StackInfo)
    except (OSError, msgspec.DecodeError):
        return None


def write_stack(path: str | os.PathLike[str], stack: StackInfo) -> None:
    """Record ``stack`` under ``path``, atomically and readable by its owner only: it holds the API key."""
    target = Path(path, STACK_FILE)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(msgspec.json.format(msgspec.json.encode(stack)))
    os.replace(tmp, target)


def forget_stack(path: str | os.PathLike[str]) -> None:
    """Remove the record under ``path``, if any: its stack is stopped."""
    with contextlib.suppress(FileNotFoundError):
        Path(path, STACK_FILE).unlink()
