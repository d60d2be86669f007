"""The registry of trainer workers: what each one serves, and whether it is alive.

A worker's main process writes its ``WorkerInfo`` under ``keys.WORKERS_KEY`` when it
starts (its training child adds ``child_pid`` and ``ready_at`` once the model is
loaded), and beats under ``keys.WORKER_HEARTBEATS_KEY`` every ``heartbeat_s`` seconds
while it runs. A worker is live while its last beat is younger than ``LIVE_BEATS``
beats: a SIGKILLed worker's entry stays behind and reads as dead. SDK calls that need
a worker, ``TrainJob.result()`` and ``trainq status`` read both hashes through
``read_workers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

__all__ = ["LIVE_BEATS", "WorkerInfo", "WorkerState", "live_on", "read_workers"]

LIVE_BEATS = 3
"""A worker that missed this many heartbeats in a row is taken for dead."""


class WorkerInfo(msgspec.Struct, kw_only=True):
    """One trainer worker, as it announced itself (``keys.WORKERS_KEY``)."""

    base_model: str
    queue: str
    pid: int
    started_at: float
    worker_id: str = ""
    """Unique per process start; the holder named in the job and leader leases."""
    heartbeat_s: float = 5.0
    child_pid: int = 0
    ready_at: float = 0.0
    ranks: int = 1
    """Ranks training the model: 1 in the training child itself, more on a torchrun group."""
    nodes: int = 1
    """Machines of that group."""


_info_decoder = msgspec.msgpack.Decoder(WorkerInfo)


@dataclass(frozen=True)
class WorkerState:
    """A registered worker and what its heartbeat says."""

    hostname: str
    info: WorkerInfo
    seen_at: float
    """Unix time of its last heartbeat; 0.0 if it never beat."""
    live: bool

    def describe(self) -> str:
        return f"{self.hostname} serves {self.info.base_model!r} (queue {self.info.queue})"


def read_workers(
    registry: Mapping[bytes, bytes], heartbeats: Mapping[bytes, bytes], now: float
) -> list[WorkerState]:
    """Every registered worker with its liveness, from ``HGETALL`` of the two hashes; unreadable entries skipped."""
    workers = []
    for raw_host, raw_info in registry.items():
        try:
            info = _info_decoder.decode(raw_info)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # written by an incompatible version; not ours to judge
        host = raw_host.decode() if isinstance(raw_host, bytes) else str(raw_host)
        beat = heartbeats.get(raw_host)
        seen_at = float(beat) if beat is not None else 0.0
        live = now - seen_at < LIVE_BEATS * info.heartbeat_s
        workers.append(WorkerState(host, info, seen_at, live))
    return sorted(workers, key=lambda w: w.hostname)


def live_on(workers: list[WorkerState], queue: str) -> list[WorkerState]:
    """The live workers that serve ``queue``."""
    return [w for w in workers if w.live and w.info.queue == queue]
