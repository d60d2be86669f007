"""The job handle and the job record it reads.

A job's record is a Redis hash (``keys.job_key``) written by the producer when
it submits and by the worker as the job runs; it is the only source of truth for
a job's status. Any process that knows a job id can rebuild the handle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from producer import keys
from producer._redis import translated_errors
from producer.errors import (
    BackendUnavailableError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    TrainTimeoutError,
)
from producer.types import JobOutcome, JobStatus, QueueTrainResult

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["JobRecord", "TrainJob"]

# Only a queued job can be cancelled; the worker claims a job with the twin
# transition (queued -> running) in one script too, so exactly one of them wins.
_CANCEL_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', KEYS[3], 'cancelled')
  return 1
end
return 0
"""

_WAIT_SLICE_S = 1.0  # re-read the record at least this often, in case a notification was missed
RECONNECT_GRACE_S = 30.0
"""How long a caller waiting on a job rides out lost contact with Redis (a restart) before it raises."""


class JobRecord(msgspec.Struct, kw_only=True):
    """A job's hash, decoded."""

    job_id: str
    status: JobStatus
    kind: str = "train"
    model: str = ""
    queue: str = ""
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    outcome: JobOutcome | None = None
    error_type: str = ""
    error: str = ""

    @classmethod
    def from_hash(cls, job_id: str, fields: Mapping[bytes | str, bytes | str]) -> JobRecord:
        text = {_text(k): v for k, v in fields.items()}
        outcome = text.pop("result", None)
        values: dict[str, Any] = {k: _text(v) for k, v in text.items() if k in _RECORD_FIELDS}
        return msgspec.convert(
            {
                **values,
                "job_id": job_id,
                "outcome": _outcome_decoder.decode(outcome) if isinstance(outcome, bytes) else None,
            },
            cls,
            strict=False,
        )

    def to_result(self) -> QueueTrainResult:
        """The caller's view of a finished job; raises for a job that did not succeed."""
        if self.status is JobStatus.CANCELLED:
            raise JobCancelledError(self.job_id)
        if self.status is JobStatus.FAILED or self.outcome is None:
            raise JobFailedError(self.job_id, self.error_type or "Error", self.error or "no result recorded")
        started = self.started_at or self.submitted_at
        return QueueTrainResult(
            step=self.outcome.step,
            metrics=self.outcome.metrics,
            job_id=self.job_id,
            checkpoint_path=self.outcome.checkpoint_path,
            queued_s=max(0.0, started - self.submitted_at),
            train_s=self.outcome.train_s,
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_outcome_decoder = msgspec.msgpack.Decoder(JobOutcome)
class _ContactLost(Exception):
    """Redis went away while waiting; ``contact_at`` is when it last answered, if it did."""

    def __init__(self, error: BackendUnavailableError, contact_at: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.contact_at = contact_at


_RECORD_FIELDS = frozenset(f for f in JobRecord.__struct_fields__ if f not in ("job_id", "outcome"))


class TrainJob:
    """A handle on one submitted job; ``backend.job(job_id)`` rebuilds it in any process."""

    def __init__(self, redis: aioredis.Redis, job_id: str) -> None:
        self._redis = redis
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"TrainJob({self.job_id!r})"

    async def record(self) -> JobRecord:
        """The job's full record; ``JobNotFoundError`` if there is none."""
        with translated_errors(f"reading job {self.job_id}"):
            fields = await self._redis.hgetall(keys.job_key(self.job_id))
        if not fields:
            raise JobNotFoundError(self.job_id)
        return JobRecord.from_hash(self.job_id, fields)

    async def status(self) -> JobStatus:
        return (await self.record()).status

    async def cancel(self) -> bool:
        """Cancel the job if it is still queued; ``True`` if it was, ``False`` if it already started or ended."""
        await self.record()  # a clear JobNotFoundError for an unknown id
        with translated_errors(f"cancelling job {self.job_id}"):
            done = await self._redis.eval(
                _CANCEL_SCRIPT,
                3,
                keys.job_key(self.job_id),
                keys.payload_key(self.job_id),
                keys.job_channel(self.job_id),
                repr(time.time()),
            )
        return bool(done)

    async def result(
        self, timeout: float | None = None, *, reconnect_grace_s: float = RECONNECT_GRACE_S
    ) -> QueueTrainResult:
        """Wait for the job to end and return its result.

        Raises ``JobFailedError`` or ``JobCancelledError`` for a job that ended
        otherwise, ``TrainTimeoutError`` after ``timeout`` seconds (the job goes
        on). Lost contact with Redis is retried, with backoff, for
        ``reconnect_grace_s`` seconds (a restart); after that, or past
        ``timeout``, it raises ``BackendUnavailableError`` and the job goes on.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_contact = time.monotonic()
        delay = 0.1
        while True:
            try:
                return await self._wait(deadline, timeout)
            except _ContactLost as lost:
                if lost.contact_at is not None:
                    last_contact, delay = lost.contact_at, 0.1
                now = time.monotonic()
                if now - last_contact > reconnect_grace_s or (deadline is not None and now >= deadline):
                    raise lost.error
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _wait(self, deadline: float | None, timeout: float | None) -> QueueTrainResult:
        """One subscription's worth of waiting; ``_ContactLost`` when Redis goes away."""
        contact_at: float | None = None
        try:
            async with self._redis.pubsub() as pubsub:
                # Subscribe before reading the record, so a change between the two is not missed.
                with translated_errors(f"waiting for job {self.job_id}"):
                    await pubsub.subscribe(keys.job_channel(self.job_id))
                while True:
                    record = await self.record()
                    contact_at = time.monotonic()
                    if record.status.is_terminal:
                        return record.to_result()
                    remaining = _WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
                    if remaining <= 0:
                        raise TrainTimeoutError(self.job_id, timeout or 0.0)
                    with translated_errors(f"waiting for job {self.job_id}"):
                        await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=min(remaining, _WAIT_SLICE_S)
                        )
        except BackendUnavailableError as exc:
            raise _ContactLost(exc, contact_at) from exc

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """Wait for the job to end, without raising for failure; returns the final status."""
        try:
            await self.result(timeout)
        except (JobFailedError, JobCancelledError):
            pass
        return await self.status()
