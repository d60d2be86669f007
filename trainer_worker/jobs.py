"""What the Celery task does with one job: decode, claim, run on the core, record.

Plain Python over a sync Redis client and a ``Trainer``; the Celery task is a
one-line shell around ``JobRunner.run``. Every way a job can end is recorded in
its job record, and no exception from a job escapes to kill the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from redis import exceptions as redis_errors

from producer import keys
from producer.errors import TrainerGroupError
from producer.types import (
    CheckpointEvent,
    JobOutcome,
    TrainRequest,
    TrajectoryGroup,
)
from trainer_worker import metrics

if TYPE_CHECKING:
    import redis

    from trainer_worker.core.trainer import Trainer
    from trainer_worker.group.client import GroupTrainer

log = logging.getLogger(__name__)

_request_decoder = msgspec.msgpack.Decoder(TrainRequest)
_groups_decoder = msgspec.msgpack.Decoder(list[TrajectoryGroup])

# queued -> running, or running -> running for a redelivered job; a terminal
# status is returned untouched so the job is skipped (exactly once).
_CLAIM_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return status
end
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[1])
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2])
redis.call('HSETNX', KEYS[1], 'submitted_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[2], 'running')
return 'run'
"""

# Client errors: the job is wrong, not the worker. Anything else is logged with its traceback.
_REJECTIONS = (ValueError, TypeError, LookupError, msgspec.DecodeError, msgspec.ValidationError)

_REDIS_RETRY_S = 120.0  # how long a finished job's record waits for Redis to come back
_GROUP_ATTEMPTS = 3  # runs of a job whose training group failed under it (each after a restart)

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024  # the same default as QueueBackend's

T = TypeVar("T")


class JobRejected(Exception):
    """The job cannot run as given; its message names what is wrong."""


def decode_request(
    raw: object, *, base_model: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> TrainRequest:
    """Decode and check a Celery message's argument; ``JobRejected`` says what is wrong.

    Args:
        raw: the task's single argument, expected to be the msgpack of a ``TrainRequest``.
        base_model: the base model this worker serves; a job for another one is rejected.
        max_bytes: a larger argument is rejected before it is decoded.
    """
    if not isinstance(raw, bytes):
        raise JobRejected(
            f"the task argument must be msgpack bytes of a TrainRequest, got {type(raw).__name__}"
        )
    if len(raw) > max_bytes:
        raise JobRejected(f"the TrainRequest is {len(raw):,} bytes, over the limit of {max_bytes:,}")
    try:
        request = _request_decoder.decode(raw)
        request.model.validate()
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise JobRejected(f"invalid TrainRequest: {exc}") from exc
    if request.model.base_model != base_model:
        raise JobRejected(
            f"job is for base model {request.model.base_model!r}, this worker serves {base_model!r}"
        )
    return request


def decode_groups(payload: bytes) -> list[TrajectoryGroup]:
    """Decode a train job's groups against the schema; ``ValueError`` says where it does not fit.

    The checks beyond the schema (``validate_groups``) are ``Trainer.train``'s,
    which runs them on every call: a second pass here cost 3-6 ms a 1 MB job.
    """
    try:
        return _groups_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"invalid groups payload: {exc}") from exc


class JobRunner:
    """Runs jobs for one base model on one ``Trainer``, recording each in Redis."""

    def __init__(self, redis_client: redis.Redis, trainer: Trainer | GroupTrainer, *, base_model: str,
                 worker_name: str, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.redis = redis_client
        self.trainer = trainer
        self.base_model = base_model
        self.worker_name = worker_name
        self.max_payload_bytes = max_payload_bytes

    def run(self, raw: object) -> None:
        """Run the job in a Celery message's argument; never raises for a bad job."""
        try:
            request = self._decode(raw)
        except JobRejected as exc:
            self._reject_undecodable(raw, exc)
            return
        if not self._claim(request):
            return
        started = time.time()
        try:
            outcome = self._execute_on_group(request)
        except _REJECTIONS as exc:
            self._finish_failed(request, exc)
        except Exception as exc:  # noqa: BLE001 - a failing job must not take the worker down
            log.exception("job %s failed", request.job_id)
            self._finish_failed(request, exc)
        else:
            self._finish_succeeded(request, outcome, started)

    # --------------------------------------------------------------- stages

    def _decode(self, raw: object) -> TrainRequest:
        return decode_request(raw, base_model=self.base_model, max_bytes=self.max_payload_bytes)

    def _claim(self, request: TrainRequest) -> bool:
        verdict = self.redis.eval(
            _CLAIM_SCRIPT,
            2,
            keys.job_key(request.job_id),
            keys.job_channel(request.job_id),
            repr(time.time()),
            self.worker_name,
            repr(request.submitted_at),
            keys.JOB_TTL_S,
        )
        verdict = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
        if verdict != "run":
            log.info("job %s is already %s; skipping it", request.job_id, verdict)
            metrics.JOBS.labels(request.model.key, request.kind, "duplicate").inc()
            return False
        metrics.QUEUE_WAIT.labels(request.model.key).observe(max(0.0, time.time() - request.submitted_at))
        return True

    def _execute_on_group(self, request: TrainRequest) -> JobOutcome:
        """``_execute``, again on the restarted group if the group failed under it: still this job's
        claim and turn, and a step the failed run finished writing is found, not made twice."""
        attempt = 1
        while True:
            try:
                return self._execute(request)
            except TrainerGroupError as exc:
                if attempt >= _GROUP_ATTEMPTS:
                    raise
                log.warning("job %s: %s (attempt %d of %d); running it again", request.job_id, exc, attempt,
                            _GROUP_ATTEMPTS)
                attempt += 1

    def _execute(self, request: TrainRequest) -> JobOutcome:
        ref = request.model
        if request.kind == "register":
            return self.trainer.register(ref)
        if request.kind == "delete_checkpoints":
            deleted = self.trainer.delete_checkpoints(ref, request.keep_steps)
            latest = self.trainer.register(ref)  # the latest step, unchanged
            return JobOutcome(step=latest.step, checkpoint_path=latest.checkpoint_path, deleted_steps=deleted)
        groups = self._load_groups(request)
        return self.trainer.train(request.job_id, ref, request.config, groups)

    def _load_groups(self, request: TrainRequest) -> list[TrajectoryGroup]:
        if request.payload_key != keys.payload_key(request.job_id):
            raise ValueError(f"payload_key must be {keys.payload_key(request.job_id)!r}, got {request.payload_key!r}")
        # STRLEN first, so an oversized payload is refused without being read into memory.
        size = self.redis.strlen(request.payload_key)
        if size == 0:
            raise LookupError(f"the job's groups are gone from {request.payload_key} (expired or deleted)")
        if size > self.max_payload_bytes:
            raise ValueError(
                f"payload: {size:,} bytes, over this worker's --max-payload-bytes={self.max_payload_bytes:,}"
            )
        payload = self.redis.get(request.payload_key)
        if payload is None:
            raise LookupError(f"the job's groups are gone from {request.payload_key} (expired or deleted)")
        return decode_groups(payload)

    # -------------------------------------------------------------- records

    def _finish_succeeded(self, request: TrainRequest, outcome: JobOutcome, started: float) -> None:
        ref = request.model
        events = _events_for(request, outcome)

        def record() -> None:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    keys.job_key(request.job_id),
                    mapping={
                        "status": "succeeded",
                        "step": outcome.step,
                        "finished_at": repr(time.time()),
                        "result": msgspec.msgpack.encode(outcome),
                    },
                )
                pipe.hset(
                    keys.model_key(ref.project, ref.name),
                    mapping={"base_model": ref.base_model, "step": outcome.step, "updated_at": repr(time.time())},
                )
                for event in events:
                    pipe.xadd(keys.CHECKPOINT_STREAM, _stream_fields(event),
                              maxlen=keys.CHECKPOINT_STREAM_MAXLEN, approximate=True)
                if request.payload_key:
                    pipe.delete(request.payload_key)
                pipe.publish(keys.job_channel(request.job_id), "succeeded")
                pipe.execute()

        _retry_redis(record, f"recording job {request.job_id}")
        self._observe_success(request, outcome, started)

    def _observe_success(self, request: TrainRequest, outcome: JobOutcome, started: float) -> None:
        model = request.model.key
        metrics.JOBS.labels(model, request.kind, "succeeded").inc()
        metrics.STEP.labels(model).set(outcome.step)
        if request.kind != "train":
            return
        metrics.TRAIN_DURATION.labels(model).observe(time.time() - started)
        metrics.TRAINED_TOKENS.labels(model).inc(outcome.metrics.get("num_tokens", 0.0))
        metrics.LAST_STEP_TIME.labels(model).set(time.time())
        for gauge, name in ((metrics.LOSS, "loss"), (metrics.REWARD, "reward")):
            if name in outcome.metrics:
                gauge.labels(model).set(outcome.metrics[name])
        if "checkpoint_save_s" in outcome.metrics:
            metrics.CHECKPOINT_SAVE.labels(model).observe(outcome.metrics["checkpoint_save_s"])

    def _finish_failed(self, request: TrainRequest, exc: BaseException) -> None:
        log.warning("job %s failed: %s: %s", request.job_id, type(exc).__name__, exc)
        self._record_failure(request.job_id, type(exc).__name__, str(exc), request.payload_key)
        metrics.JOBS.labels(request.model.key, request.kind, "failed").inc()

    def _reject_undecodable(self, raw: object, exc: JobRejected) -> None:
        job_id = _salvage_job_id(raw)
        log.warning("rejected job %s: %s", job_id or "(no job id)", exc)
        if job_id:
            self._record_failure(job_id, "InvalidJobError", str(exc), keys.payload_key(job_id))
        metrics.JOBS.labels("", "", "failed").inc()

    def _record_failure(self, job_id: str, error_type: str, message: str, payload_key: str | None) -> None:
        def record() -> None:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    keys.job_key(job_id),
                    mapping={"status": "failed", "error_type": error_type, "error": message,
                             "finished_at": repr(time.time())},
                )
                pipe.expire(keys.job_key(job_id), keys.JOB_TTL_S)
                if payload_key:
                    pipe.delete(payload_key)
                pipe.publish(keys.job_channel(job_id), "failed")
                pipe.execute()

        _retry_redis(record, f"recording the failure of job {job_id}")


def _events_for(request: TrainRequest, outcome: JobOutcome) -> list[CheckpointEvent]:
    ref = request.model

    def event(kind: str, step: int, path: str) -> CheckpointEvent:
        return CheckpointEvent(kind=kind, project=ref.project, model=ref.name, step=step, path=path,  # type: ignore[arg-type]
                               job_id=request.job_id, base_model=ref.base_model, created_at=time.time())

    if request.kind == "delete_checkpoints":
        return [event("deleted", step, "") for step in outcome.deleted_steps]
    if request.kind == "register" and outcome.step != 0:
        return []  # re-registering a trained model: its checkpoints were announced when made
    return [event("saved", outcome.step, outcome.checkpoint_path or "")]


def _stream_fields(event: CheckpointEvent) -> dict[str, str]:
    return {name: str(value) for name, value in msgspec.structs.asdict(event).items()}


def _salvage_job_id(raw: object) -> str | None:
    """The job id of an undecodable request, if it has a plausible one, so its caller hears of the failure."""
    if not isinstance(raw, bytes):
        return None
    try:
        fields: Any = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return None
    job_id = fields.get("job_id") if isinstance(fields, dict) else None
    return job_id if isinstance(job_id, str) and job_id.isalnum() and len(job_id) <= 64 else None


def _retry_redis(action: Callable[[], T], what: str) -> T:
    """Run ``action``, retrying while Redis is unreachable (a restart), for up to ``_REDIS_RETRY_S``."""
    deadline = time.monotonic() + _REDIS_RETRY_S
    delay = 0.1
    while True:
        try:
            return action()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: Redis unreachable (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
