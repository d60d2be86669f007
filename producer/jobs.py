"""The job handle and the job record it reads.

A job's record is a Redis hash (``keys.job_key``) written by the producer when
it submits and by the worker as the job runs; it is the only source of truth for
a job's status. Any process that knows a job id can rebuild the handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from tenacity import AsyncRetrying

from producer import keys
from producer._redis import UNREACHABLE, redis_retrying, translated_errors
from producer.errors import (
    BackendUnavailableError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    NoWorkerError,
    TrainTimeoutError,
)
from producer.types import JobOutcome, JobStatus, QueueTrainResult
from producer.workers import WorkerState, live_on, read_workers

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["JobListener", "JobRecord", "TrainJob"]

log = logging.getLogger(__name__)

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

POLL_S = 1.0
"""Every waited record is re-read this often, in case a notification was missed."""
RECONNECT_GRACE_S = 30.0
"""How long a caller waiting on a job rides out lost contact with Redis (a restart) before it raises."""
WORKER_GRACE_S = 60.0
"""How long a waited job's queue may have no live worker (a restart) before its waiters get ``NoWorkerError``."""
_SUBSCRIBE_LAG_S = 0.05  # a new waiter is subscribed (and its record read) within this
_CHANNEL_PREFIX, _CHANNEL_SUFFIX = keys.job_channel("\0").split("\0")


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
    """Deliveries of the job to a worker that started it."""
    requeues: int = 0
    """Times it went back to its queue (its worker died, or lost the queue's lead)."""
    worker: str = ""
    """The worker that ran it last."""
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
_RECORD_FIELDS = frozenset(f for f in JobRecord.__struct_fields__ if f not in ("job_id", "outcome"))


class TrainJob:
    """A handle on one submitted job; ``backend.job(job_id)`` rebuilds it in any process.

    Args:
        redis: the backend's client.
        job_id: the job's id.
        listener: the backend's ``JobListener``, shared by all its handles (a private one if not given).
    """

    def __init__(self, redis: aioredis.Redis, job_id: str, listener: JobListener | None = None) -> None:
        self._redis = redis
        self.job_id = job_id
        self._listener = listener or JobListener(redis)

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
        on), ``NoWorkerError`` once no live worker has served the job's queue for
        the backend's ``worker_grace_s`` (the job stays queued). Lost contact with
        Redis is ridden out for ``reconnect_grace_s`` seconds (a restart); after
        that it raises ``BackendUnavailableError`` and the job goes on.
        """
        try:
            record = await self._listener.wait(self.job_id, timeout=timeout, reconnect_grace_s=reconnect_grace_s)
        except TimeoutError:
            raise TrainTimeoutError(self.job_id, timeout or 0.0) from None
        return record.to_result()

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """Wait for the job to end, without raising for failure; returns the final status."""
        try:
            await self.result(timeout)
        except (JobFailedError, JobCancelledError):
            pass
        return await self.status()


class _Waiter:
    """One ``result()`` call waiting: its future and how long it rides out lost contact with Redis."""

    __slots__ = ("future", "reconnect_grace_s")

    def __init__(self, future: asyncio.Future[JobRecord], reconnect_grace_s: float) -> None:
        self.future = future
        self.reconnect_grace_s = reconnect_grace_s


class JobListener:
    """Waits for every job a backend waits on, over one pub/sub connection and one batched read a second.

    ``TrainJob.result()`` registers a future here. One task subscribes to the
    waited jobs' channels on a single pub/sub connection (then reads their records,
    so a change in between is not missed), re-reads the record of a job whose
    channel speaks, and every ``poll_s`` re-reads all waited records in one
    pipeline, in case a notification was lost across a reconnect. The same read
    takes the worker registry: a job whose queue has had no live worker for
    ``worker_grace_s`` fails its waiters with ``NoWorkerError``. While Redis is
    unreachable the task reconnects with backoff, and each waiter whose
    ``reconnect_grace_s`` has run out since Redis last answered gets
    ``BackendUnavailableError``. Whatever the number of waiters, the backend holds
    one connection for them, and borrows one from its pool to read.

    Args:
        redis: the backend's client.
        poll_s: seconds between two reads of every waited record.
        worker_grace_s: how long a waited job's queue may have no live worker.
    """

    def __init__(self, redis: aioredis.Redis, *, poll_s: float = POLL_S, worker_grace_s: float = WORKER_GRACE_S) -> None:
        self._redis = redis
        self.poll_s = poll_s
        self.worker_grace_s = worker_grace_s
        self._waiters: dict[str, set[_Waiter]] = {}
        self._changed = False  # waiters came or went since the subscriptions were last updated
        self._task: asyncio.Task[None] | None = None
        self._last_contact = time.monotonic()
        self._unserved_since: dict[str, float] = {}

    async def wait(self, job_id: str, *, timeout: float | None, reconnect_grace_s: float) -> JobRecord:
        """The job's record once it is terminal; ``TimeoutError`` after ``timeout`` seconds."""
        waiter = _Waiter(asyncio.get_running_loop().create_future(), reconnect_grace_s)
        self._waiters.setdefault(job_id, set()).add(waiter)
        self._changed = True
        if self._task is None or self._task.done():
            self._last_contact = time.monotonic()
            self._task = asyncio.create_task(self._run(), name="trainq-job-listener")
        try:
            return await asyncio.wait_for(waiter.future, timeout)
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._waiters[job_id]
                    self._changed = True

    async def aclose(self) -> None:
        """Stop listening; whoever still waits gets ``BackendUnavailableError``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail(list(self._waiters), BackendUnavailableError("the backend was closed while waiting"))

    # ------------------------------------------------------------- the task

    async def _run(self) -> None:
        # Checked again after each session: a waiter may arrive while the last one closes its connection.
        while self._waiters:
            retrying = AsyncRetrying(**redis_retrying("waiting for jobs", log, stop=lambda _: not self._waiters))
            try:
                await retrying(self._listen)
            except UNREACHABLE as exc:
                self._fail(list(self._waiters), exc)

    async def _listen(self) -> None:
        try:
            async with self._redis.pubsub() as pubsub:
                subscribed: set[str] = set()
                next_poll = 0.0
                while self._waiters:
                    fresh = await self._subscribe(pubsub, subscribed)
                    if time.monotonic() >= next_poll:
                        await self._read(list(self._waiters), registry=True)
                        next_poll = time.monotonic() + self.poll_s
                    elif fresh:
                        await self._read(fresh, registry=False)
                    spoke = await self._notified(pubsub, min(_SUBSCRIBE_LAG_S, next_poll - time.monotonic()))
                    if spoke:
                        await self._read(spoke, registry=False)
        except UNREACHABLE as exc:
            self._give_up_on_lost_contact(exc)
            raise

    async def _subscribe(self, pubsub: Any, subscribed: set[str]) -> list[str]:
        """Follow the waited jobs' channels; return the jobs newly followed."""
        if not self._changed and subscribed:
            return []
        self._changed = False
        fresh = [job_id for job_id in self._waiters if job_id not in subscribed]
        gone = [job_id for job_id in subscribed if job_id not in self._waiters]
        with translated_errors("waiting for jobs"):
            if fresh:
                await pubsub.subscribe(*(keys.job_channel(job_id) for job_id in fresh))
            if gone:
                await pubsub.unsubscribe(*(keys.job_channel(job_id) for job_id in gone))
        subscribed.update(fresh)
        subscribed.difference_update(gone)
        return fresh

    async def _notified(self, pubsub: Any, timeout: float) -> list[str]:
        """The jobs whose channel spoke within ``timeout`` seconds (all messages already there)."""
        spoke: list[str] = []
        with translated_errors("waiting for jobs"):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=max(0.0, timeout))
            while message is not None:
                channel = _text(message["channel"])
                spoke.append(channel[len(_CHANNEL_PREFIX): -len(_CHANNEL_SUFFIX)])
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0)
        return spoke

    async def _read(self, job_ids: list[str], *, registry: bool) -> None:
        """Read these jobs' records in one round trip (and the worker registry) and settle the ended ones."""
        if not job_ids:
            return
        with translated_errors("waiting for jobs"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hgetall(keys.job_key(job_id))
                if registry:
                    pipe.hgetall(keys.WORKERS_KEY)
                    pipe.hgetall(keys.WORKER_HEARTBEATS_KEY)
                replies = await pipe.execute()
        self._last_contact = time.monotonic()
        pending: dict[str, list[str]] = {}
        for job_id, fields in zip(job_ids, replies, strict=False):
            if not fields:
                self._fail([job_id], JobNotFoundError(job_id))
                continue
            record = JobRecord.from_hash(job_id, fields)
            if record.status.is_terminal:
                self._settle(job_id, record)
            elif record.queue:
                pending.setdefault(record.queue, []).append(job_id)
        if registry:
            self._check_workers(pending, read_workers(replies[-2], replies[-1], time.time()))

    def _check_workers(self, pending: dict[str, list[str]], workers: list[WorkerState]) -> None:
        now = time.monotonic()
        for queue in list(self._unserved_since):
            if queue not in pending:
                del self._unserved_since[queue]
        for queue, job_ids in pending.items():
            if live_on(workers, queue):
                self._unserved_since.pop(queue, None)
                continue
            since = self._unserved_since.setdefault(queue, now)
            if now - since >= self.worker_grace_s:
                live = [w.describe() for w in workers if w.live]
                self._fail(job_ids, NoWorkerError(queue, live, waited_s=now - since))

    def _give_up_on_lost_contact(self, exc: BaseException) -> None:
        lost_s = time.monotonic() - self._last_contact
        error = exc if isinstance(exc, BackendUnavailableError) else BackendUnavailableError(
            f"waiting for jobs: Redis is unreachable ({exc})")
        for job_id, waiting in list(self._waiters.items()):
            for waiter in list(waiting):
                if lost_s > waiter.reconnect_grace_s and not waiter.future.done():
                    waiter.future.set_exception(error)

    def _settle(self, job_id: str, record: JobRecord) -> None:
        for waiter in self._waiters.get(job_id, ()):
            if not waiter.future.done():
                waiter.future.set_result(record)

    def _fail(self, job_ids: list[str], error: BaseException) -> None:
        for job_id in job_ids:
            for waiter in self._waiters.get(job_id, ()):
                if not waiter.future.done():
                    waiter.future.set_exception(error)
