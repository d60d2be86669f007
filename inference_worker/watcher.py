"""Reads the checkpoint stream and turns its events into adapters to serve or drop.

Every replica reads the whole stream on its own (XREAD from ``0``, no
consumer group), so a replica that starts late or restarts catches up on
every retained checkpoint. A malformed entry is counted, logged and skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, stop_never

from inference_worker.adapters import Adapter, AdapterManager
from inference_worker.metrics import InferenceMetrics
from producer._redis import redis_retrying
from producer.errors import BackendUnavailableError
from producer.keys import CHECKPOINT_STREAM
from producer.names import validate_name
from producer.types import CheckpointEvent

__all__ = ["CheckpointWatcher", "decode_event"]

log = logging.getLogger(__name__)

_BLOCK_MS = 5_000
_BATCH = 200
# Waits between reads while Redis is unreachable: a replica notices Redis back within 30 s.
_FIRST_RETRY_S = 0.5
_MAX_RETRY_S = 30.0


def decode_event(fields: dict[str, str]) -> CheckpointEvent:
    """A stream entry (every field a string) as a checked ``CheckpointEvent``; ``ValueError`` if malformed."""
    try:
        event = msgspec.convert(fields, CheckpointEvent, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"malformed checkpoint event: {exc}") from exc
    validate_name(event.project, "project")
    validate_name(event.model, "model name")
    if event.step < 0:
        raise ValueError(f"malformed checkpoint event: step must be >= 0, got {event.step}")
    return event


class CheckpointWatcher:
    """Follows ``trainq:checkpoints`` from the start and keeps ``adapters`` up to date.

    ``base_models`` are the names this worker's base model goes by (as given and
    as resolved); events of other base models are skipped, as are saved
    checkpoints whose folder is gone (deleted since, or never on this machine).
    """

    def __init__(
        self,
        redis_url: str,
        adapters: AdapterManager,
        metrics: InferenceMetrics,
        *,
        base_models: Iterable[str],
        checkpoint_root: str,
        stream: str = CHECKPOINT_STREAM,
    ) -> None:
        self._redis = aioredis.from_url(redis_url, decode_responses=True, socket_timeout=_BLOCK_MS / 1000 + 10)
        self._adapters = adapters
        self._metrics = metrics
        self._base_models = {b for b in base_models if b}
        self._checkpoint_root = Path(checkpoint_root)
        self._stream = stream
        self._started_at = time.time()
        self.position = "0-0"

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def run(self) -> None:
        """Read and apply events until cancelled; Redis outages are waited out.

        A read that fails is tried again after 0.5 s, doubling to 30 s while Redis
        stays away; the next outage starts over at 0.5 s.
        """
        reading = AsyncRetrying(**redis_retrying(
            f"reading {self._stream}", log, stop_never, first_wait_s=_FIRST_RETRY_S, max_wait_s=_MAX_RETRY_S,
        ))
        while True:
            entries: list[tuple[str, dict[str, Any]]] = await reading(self._read)
            for entry_id, fields in entries:
                await self.apply(entry_id, fields)
                self.position = entry_id

    async def apply(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            event = decode_event(fields)
        except ValueError as exc:
            self._metrics.checkpoint_events.labels("invalid").inc()
            log.error("skipping stream entry %s: %s", entry_id, exc)
            return
        self._metrics.checkpoint_events.labels(event.kind).inc()
        if event.base_model and event.base_model not in self._base_models:
            log.debug("skipping %s: base model %s is not served here", event.inference_name, event.base_model)
            return
        if event.kind == "deleted":
            await self._adapters.remove(event.inference_name)
            return
        path = self._find_checkpoint(event)
        if path is None:
            log.info("skipping %s: no checkpoint at %s", event.inference_name, event.path)
            return
        await self._adapters.add(
            Adapter(
                name=event.inference_name,
                path=str(path),
                model_key=f"{event.project}/{event.model}",
                created_at=event.created_at,
                live=event.created_at >= self._started_at,
            )
        )

    def _find_checkpoint(self, event: CheckpointEvent) -> Path | None:
        """The event's path if it exists here, else the same checkpoint under our own root.

        The second covers a shared volume mounted at another path on this machine.
        """
        local = self._checkpoint_root / event.project / event.model / "checkpoints" / f"{event.step:04d}"
        for candidate in (Path(event.path) if event.path else None, local):
            if candidate is not None and (candidate / "adapter_config.json").is_file():
                return candidate.resolve()
        return None

    async def _read(self) -> list[tuple[str, dict[str, Any]]]:
        """The next entries after ``position``, waiting up to a few seconds; Redis errors translated here."""
        try:
            reply: Any = await self._redis.xread({self._stream: self.position}, count=_BATCH, block=_BLOCK_MS)
        except RedisError as exc:
            raise BackendUnavailableError(f"reading {self._stream} from Redis failed: {exc!r}") from exc
        if not reply:
            return []
        _stream, entries = reply[0]  # RESP2 (redis-py's default): [[stream, [(id, fields), ...]]]
        return list(entries)
