"""What the Celery task does with one job: decode, claim, run on the core, commit.

Plain Python over a sync Redis client and a ``Trainer``; the Celery task is a
thin shell around ``JobRunner.run``. Every way a job can end is recorded in its
job record, and no exception from a job escapes to kill the worker.

Exactly once, with Redis as the truth (the scripts below, each one atomic):

- *claim*: a job whose record is terminal, or that is already in its model's
  steps hash (``keys.model_steps_key``), is not run again. Only the queue's
  leader claims (its fencing token comes with the claim); a job delivered more
  than ``max_attempts`` times without finishing fails as a poison job.
- *commit*: the step is made in one script that checks the fencing token and
  that the job is still this attempt's, moves the model's step from N to N + 1
  (compare and set: a step never goes back), records job -> step, marks the job
  succeeded and adds the checkpoint event. A writer that lost the queue hands
  its job back to the front of the queue instead.
- A step folder beyond the committed step is a write that was never committed:
  the job that wrote it commits it on its next delivery, any other job sets it
  aside (``Trainer.train``).
- Redis unreachable for longer than ``redis_retry_s`` while recording: the job
  is not done, so the task raises ``RecordLost`` and the message goes back; the
  next delivery finds the step on disk and commits it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay

from producer import keys
from producer._redis import UNREACHABLE, redis_retrying, reply_bytes
from producer.defaults import DEFAULT_MAX_PAYLOAD_BYTES
from producer.errors import TrainerGroupError
from producer.types import (
    CheckpointEvent,
    JobOutcome,
    TrainRequest,
    TrajectoryGroup,
)
from trainer_worker import broker, metrics
from trainer_worker.core import checkpoints
from trainer_worker.core.checkpoints import Writer

if TYPE_CHECKING:
    import redis

    from trainer_worker.core.trainer import Trainer
    from trainer_worker.group.client import GroupTrainer

__all__ = [
    "DEFAULT_LEASE_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_REDIS_RETRY_S",
    "REQUEUED_SCRIPT",
    "Claim",
    "Fenced",
    "JobRejected",
    "JobRunner",
    "RecordLost",
    "decode_groups",
    "decode_request",
]

log = logging.getLogger(__name__)

_request_decoder = msgspec.msgpack.Decoder(TrainRequest)
_groups_decoder = msgspec.msgpack.Decoder(list[TrajectoryGroup])

_TERMINAL = "status == 'succeeded' or status == 'failed' or status == 'cancelled'"

# KEYS: job, channel, leader, running set, lease, model steps hash, model hash.
# ARGV: now, worker name, submitted_at, job ttl, worker id, max attempts, lease ms, job id, delivery tag.
# Returns {'skip', status} | {'made', step} | {'standby'} | {'poison', runs} | {'run', token, attempt, step}.
_CLAIM_SCRIPT = f"""
local status = redis.call('HGET', KEYS[1], 'status')
if {_TERMINAL} then
  redis.call('SREM', KEYS[4], ARGV[8])
  return {{'skip', status}}
end
local made = redis.call('HGET', KEYS[6], ARGV[8])
if made then
  return {{'made', made}}
end
local leader = redis.call('GET', KEYS[3])
local token, holder = string.match(leader or '', '^(%d+) (.+)$')
if holder ~= ARGV[5] then
  return {{'standby'}}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[6]) then
  local runs = attempts - 1
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error_type', 'PoisonJobError', 'finished_at', ARGV[1],
    'error', 'the job was started ' .. runs .. ' times and never finished: its worker died (killed, out of '
    .. 'memory?) or lost Redis each time; failing it so the queue moves on (--max-attempts ' .. ARGV[6] .. ')')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('SREM', KEYS[4], ARGV[8])
  redis.call('DEL', KEYS[5])
  redis.call('PUBLISH', KEYS[2], 'failed')
  return {{'poison', runs}}
end
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[1])
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'token', token, 'delivery_tag', ARGV[9])
redis.call('HSETNX', KEYS[1], 'submitted_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[5], ARGV[5], 'PX', ARGV[7])
redis.call('SADD', KEYS[4], ARGV[8])
redis.call('PUBLISH', KEYS[2], 'running')
return {{'run', token, attempts, redis.call('HGET', KEYS[7], 'step') or ''}}
"""

# The fencing check of every write: this attempt still holds the queue's token and the job.
_FENCE = f"""
if redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return {{'fenced'}}
end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] then
  return {{'superseded'}}
end
local status = redis.call('HGET', KEYS[1], 'status')
if {_TERMINAL} then
  return {{'ended'}}
end
"""

# KEYS: job, channel, token counter, running set, lease, payload, model hash, model steps hash, stream.
# ARGV: job id, token, attempt, now, result, job ttl, expected step ('' = none yet, '-' = any),
#       new step ('' = unchanged), base model, steps-hash entry ('1'/'0'), stream maxlen, then per event:
#       a field count and that many name/value pairs.
_COMMIT_SCRIPT = _FENCE + """
local current = redis.call('HGET', KEYS[7], 'step')
if (ARGV[7] == '' and current) or (ARGV[7] ~= '' and ARGV[7] ~= '-' and current ~= ARGV[7]) then
  return {'conflict', current or ''}
end
local step = current
if ARGV[8] ~= '' then
  step = ARGV[8]
  redis.call('HSET', KEYS[7], 'base_model', ARGV[9], 'step', step, 'updated_at', ARGV[4])
  if ARGV[10] == '1' then
    redis.call('HSET', KEYS[8], ARGV[1], step)
  end
end
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'step', step, 'finished_at', ARGV[4], 'result', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
local i = 12
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[11], '*', unpack(ARGV, i + 1, i + 2 * n))
  i = i + 1 + 2 * n
end
redis.call('DEL', KEYS[6], KEYS[5])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('PUBLISH', KEYS[2], 'succeeded')
return {'ok'}
"""

# KEYS as the commit's first six. ARGV: job id, token ('' = unclaimed: no fence), attempt, now, error type,
# error, job ttl.
_FAIL_SCRIPT = """
if ARGV[2] ~= '' then
""" + _FENCE.replace("\n", "\n  ") + f"""
end
local status = redis.call('HGET', KEYS[1], 'status')
if {_TERMINAL} then
  return {{'ended'}}
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error_type', ARGV[5], 'error', ARGV[6], 'finished_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('DEL', KEYS[6], KEYS[5])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('PUBLISH', KEYS[2], 'failed')
return {{'ok'}}
"""

# A job handed back, its message about to go back in the queue: queued again, unless it moved on
# meanwhile or a live worker other than this one holds its lease.
# KEYS: job, channel, running set, lease. ARGV: job id, worker id ('' = none), attempt ('' = any), now.
REQUEUED_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'queued' then
  return 0
end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[2] then
  return 0
end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'requeued_at', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'requeues', 1)
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', KEYS[2], 'queued')
return 1
"""

# Client errors: the job is wrong, not the worker. Anything else is logged with its traceback.
_REJECTIONS = (ValueError, TypeError, LookupError, msgspec.DecodeError, msgspec.ValidationError)

DEFAULT_REDIS_RETRY_S = 120.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_S = 15.0
_GROUP_ATTEMPTS = 3  # runs of a job whose training group failed under it (each after a restart)

T = TypeVar("T")


class JobRejected(Exception):
    """The job cannot run as given; its message names what is wrong."""


class Fenced(Exception):
    """Another worker leads the queue now, or another delivery took the job over: this attempt must not write."""

    def __init__(self, message: str, *, superseded: bool = False) -> None:
        super().__init__(message)
        self.superseded = superseded


class RecordLost(Exception):
    """Redis stayed unreachable for the retry window: the job is not done and must be delivered again."""


@dataclass(frozen=True)
class Claim:
    """What the claim script decided; ``token``, ``attempt`` and ``step`` only for ``verdict == "run"``."""

    verdict: str
    token: str = ""
    attempt: str = ""
    step: int | None = None
    """The model's committed step when the job was claimed; ``None`` if it has none yet."""
    detail: str = ""


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
    """Runs jobs for one base model on one ``Trainer``, recording each in Redis.

    Args:
        redis_client: a synchronous client of the stack's Redis.
        trainer: the training core.
        base_model: what this worker serves (``--base-model``); its queue is derived from it.
        worker_name: the worker's hostname, recorded with each job and step.
        worker_id: unique per worker process start; the leader key names it when this worker leads.
        max_payload_bytes: a larger job is refused before it is read.
        max_attempts: a job delivered more often without finishing fails as a poison job.
        lease_s: how long a job's lease lasts; the worker's main process renews it.
        redis_retry_s: how long a record write rides out an unreachable Redis before the job is handed back.
        layout: kombu's key names, to hand a job back to the front of its queue.
    """

    def __init__(self, redis_client: redis.Redis, trainer: Trainer | GroupTrainer, *, base_model: str,
                 worker_name: str, worker_id: str = "", max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, lease_s: float = DEFAULT_LEASE_S,
                 redis_retry_s: float = DEFAULT_REDIS_RETRY_S, layout: broker.BrokerLayout | None = None) -> None:
        self.redis = redis_client
        self.trainer = trainer
        self.base_model = base_model
        self.queue = keys.queue_name(base_model)
        self.worker_name = worker_name
        self.worker_id = worker_id or worker_name
        self.max_payload_bytes = max_payload_bytes
        self.max_attempts = max_attempts
        self.lease_s = lease_s
        self.redis_retry_s = redis_retry_s
        self.layout = layout or broker.BrokerLayout.from_transport_options({})

    def run(self, raw: object, delivery_tag: str = "") -> None:
        """Run the job in a Celery message's argument; never raises for a bad job.

        Raises ``RecordLost`` when Redis stayed unreachable for ``redis_retry_s``:
        the job is not done and its message must go back.
        """
        try:
            self._run(raw, delivery_tag)
        except UNREACHABLE as exc:
            self.trainer.forget()
            raise RecordLost(f"Redis unreachable for {self.redis_retry_s:.0f} s; the job goes back to its queue "
                             f"and its next delivery commits what this one made ({exc})") from exc

    # --------------------------------------------------------------- stages

    def _run(self, raw: object, delivery_tag: str) -> None:
        try:
            request = self._decode(raw)
        except JobRejected as exc:
            self._reject_undecodable(raw, exc)
            return
        claim = self._claim(request, delivery_tag)
        if claim.verdict != "run":
            self._not_run(request, claim, delivery_tag)
            return
        started = time.time()
        try:
            outcome = self._execute_on_group(request, claim)
        except Fenced as exc:
            self._hand_back(request, claim, delivery_tag, str(exc), superseded=exc.superseded)
        except FileExistsError as exc:
            # A writer fenced out meanwhile renamed its copy of this step: the next delivery sorts it out.
            self._hand_back(request, claim, delivery_tag, str(exc))
        except UNREACHABLE:
            raise
        except _REJECTIONS as exc:
            self._finish_failed(request, claim, delivery_tag, exc)
        except Exception as exc:  # a failing job must not take the worker down
            log.exception("job %s failed", request.job_id)
            self._finish_failed(request, claim, delivery_tag, exc)
        else:
            self._finish_succeeded(request, claim, outcome, delivery_tag, started)

    def _decode(self, raw: object) -> TrainRequest:
        return decode_request(raw, base_model=self.base_model, max_bytes=self.max_payload_bytes)

    def _claim(self, request: TrainRequest, delivery_tag: str) -> Claim:
        ref = request.model
        reply = self._retry_redis(partial(
            self.redis.eval, _CLAIM_SCRIPT, 7,
            keys.job_key(request.job_id), keys.job_channel(request.job_id), keys.queue_leader_key(self.queue),
            keys.queue_running_key(self.queue), keys.job_lease_key(request.job_id),
            keys.model_steps_key(ref.project, ref.name), keys.model_key(ref.project, ref.name),
            repr(time.time()), self.worker_name, repr(request.submitted_at), keys.JOB_TTL_S, self.worker_id,
            self.max_attempts, int(self.lease_s * 1000), request.job_id, delivery_tag,
        ), f"claiming job {request.job_id}")
        fields = [_text(f) for f in reply]
        if fields[0] == "run":
            step = int(fields[3]) if fields[3] else None
            metrics.QUEUE_WAIT.labels(ref.key).observe(max(0.0, time.time() - request.submitted_at))
            return Claim("run", token=fields[1], attempt=fields[2], step=step)
        return Claim(fields[0], detail=fields[1] if len(fields) > 1 else "")

    def _not_run(self, request: TrainRequest, claim: Claim, delivery_tag: str) -> None:
        model = request.model.key
        if claim.verdict == "skip":
            log.info("job %s is already %s; skipping it", request.job_id, claim.detail)
            metrics.JOBS.labels(model, request.kind, "duplicate").inc()
        elif claim.verdict == "made":
            self._record_made(request, int(claim.detail))
            metrics.JOBS.labels(model, request.kind, "duplicate").inc()
        elif claim.verdict == "standby":
            self._hand_back(request, claim, delivery_tag, "this worker does not lead the queue")
        elif claim.verdict == "poison":
            log.error("job %s started %s times without finishing; failed as a poison job", request.job_id,
                      claim.detail)
            metrics.JOBS.labels(model, request.kind, "failed").inc()

    def _execute_on_group(self, request: TrainRequest, claim: Claim) -> JobOutcome:
        """``_execute``, again on the restarted group if the group failed under it: still this job's
        claim and turn, and a step the failed run finished writing is committed, not made twice."""

        def say(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("job %s: %s (attempt %d of %d); running it again", request.job_id, error,
                        state.attempt_number, _GROUP_ATTEMPTS)

        # No wait between runs: the group client has started the group again before it raises.
        retrying = Retrying(retry=retry_if_exception_type(TrainerGroupError), stop=stop_after_attempt(_GROUP_ATTEMPTS),
                            before_sleep=say, reraise=True)
        return retrying(self._execute, request, claim)

    def _execute(self, request: TrainRequest, claim: Claim) -> JobOutcome:
        ref = request.model
        writer = Writer(int(claim.token), self.worker_name, partial(self._fence, request.job_id, claim))
        if request.kind == "register":
            if claim.step is None:
                return self.trainer.register(ref, writer=writer)
            return self.trainer.outcome_of(ref, claim.step)
        if claim.step is None:
            raise LookupError(f"model {ref.key} is not registered; call model.register(backend) first")
        if request.kind == "delete_checkpoints":
            deleted = self.trainer.delete_checkpoints(ref, request.keep_steps, latest=claim.step, writer=writer)
            latest = self.trainer.outcome_of(ref, claim.step)
            return JobOutcome(step=latest.step, checkpoint_path=latest.checkpoint_path, deleted_steps=deleted)
        groups = self._load_groups(request)
        return self.trainer.train(request.job_id, ref, request.config, groups, base_step=claim.step, writer=writer)

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
        return decode_groups(reply_bytes(payload))

    def _fence(self, job_id: str, claim: Claim) -> None:
        """Raise ``Fenced`` unless this attempt may still write: checked before a step's rename or deletion.

        Reads only (one MULTI/EXEC), so it goes through while Redis holds writes back.
        """

        def read() -> list[Any]:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(keys.queue_token_key(self.queue))
                pipe.hmget(keys.job_key(job_id), "attempts", "status")
                return pipe.execute()

        token, (attempt, status) = self._retry_redis(read, f"checking job {job_id}'s fencing token")
        if token is None or _text(token) != claim.token:
            raise Fenced(f"job {job_id}: the queue's fencing token moved from {claim.token} to "
                         f"{_text(token) if token else '(none)'}: another worker leads it")
        if attempt is None or _text(attempt) != claim.attempt or _text(status) not in ("running", "queued"):
            raise Fenced(f"job {job_id}: taken over by another delivery (attempt {claim.attempt})", superseded=True)

    # -------------------------------------------------------------- records

    def _finish_succeeded(self, request: TrainRequest, claim: Claim, outcome: JobOutcome, delivery_tag: str,
                          started: float) -> None:
        ref = request.model
        expected, new = _step_change(request, claim, outcome)
        events = [_stream_fields(event) for event in _events_for(request, outcome, committed=new != "")]
        flat_events: list[Any] = []
        for fields in events:
            flat_events += [len(fields), *(item for pair in fields.items() for item in pair)]
        reply = self._retry_redis(partial(
            self.redis.eval, _COMMIT_SCRIPT, 9, *self._record_keys(request.job_id),
            keys.model_key(ref.project, ref.name), keys.model_steps_key(ref.project, ref.name),
            keys.CHECKPOINT_STREAM,
            request.job_id, claim.token, claim.attempt, repr(time.time()), msgspec.msgpack.encode(outcome),
            keys.JOB_TTL_S, expected, new, ref.base_model, "1" if request.kind == "train" else "0",
            keys.CHECKPOINT_STREAM_MAXLEN, *flat_events,
        ), f"recording job {request.job_id}")
        verdict = [_text(f) for f in reply]
        if verdict[0] == "ok":
            self._observe_success(request, outcome, started)
        elif verdict[0] == "conflict":
            log.error("job %s: model %s is at step %s in Redis, not %s; handing the job back to run on it",
                      request.job_id, ref.key, verdict[1] or "(none)", expected or "(none)")
            self._hand_back(request, claim, delivery_tag, "the model's step moved")
        else:
            self._hand_back(request, claim, delivery_tag, verdict[0], superseded=verdict[0] != "fenced")

    def _observe_success(self, request: TrainRequest, outcome: JobOutcome, started: float) -> None:
        model = request.model.key
        metrics.JOBS.labels(model, request.kind, "succeeded").inc()
        metrics.STEP.labels(model).set(outcome.step)
        if request.kind != "train":
            return
        metrics.TRAIN_DURATION.labels(model).observe(time.time() - started)
        metrics.TRAINED_TOKENS.labels(model).inc(outcome.metrics.get("num_tokens", 0.0))
        metrics.LAST_STEP_TIME.labels(model).set(time.time())
        for name, gauge in metrics.STEP_GAUGES.items():
            if name in outcome.metrics:
                gauge.labels(model).set(outcome.metrics[name])
        metrics.RENDERED_TRAJECTORIES.labels(model).inc(outcome.metrics.get("num_trajectories_rendered", 0.0))
        if "checkpoint_save_s" in outcome.metrics:
            metrics.CHECKPOINT_SAVE.labels(model).observe(outcome.metrics["checkpoint_save_s"])

    def _finish_failed(self, request: TrainRequest, claim: Claim, delivery_tag: str, exc: BaseException) -> None:
        log.warning("job %s failed: %s: %s", request.job_id, type(exc).__name__, exc)
        self.trainer.forget()
        verdict = self._record_failure(request.job_id, type(exc).__name__, str(exc), claim)
        if verdict == "ok":
            metrics.JOBS.labels(request.model.key, request.kind, "failed").inc()
        elif verdict == "fenced":
            # Another worker leads now (it may be what broke this run): the job is its to run.
            self._hand_back(request, claim, delivery_tag, "fenced out while failing")

    def _reject_undecodable(self, raw: object, exc: JobRejected) -> None:
        job_id = _salvage_job_id(raw)
        log.warning("rejected job %s: %s", job_id or "(no job id)", exc)
        if job_id:
            self._record_failure(job_id, "InvalidJobError", str(exc), Claim("rejected"))
        metrics.JOBS.labels("", "", "failed").inc()

    def _record_failure(self, job_id: str, error_type: str, message: str, claim: Claim) -> str:
        reply = self._retry_redis(partial(
            self.redis.eval, _FAIL_SCRIPT, 6, *self._record_keys(job_id),
            job_id, claim.token, claim.attempt, repr(time.time()), error_type, message, keys.JOB_TTL_S,
        ), f"recording the failure of job {job_id}")
        return _text(reply[0])

    def _record_made(self, request: TrainRequest, step: int) -> None:
        """A delivery of a job whose step is already committed (its record expired): done, nothing written."""
        ref = request.model
        log.info("job %s already made step %d of %s; recording it, not training again", request.job_id, step,
                 ref.key)
        info = checkpoints.read_info_if_any(self.trainer.checkpoint_root, ref.project, ref.name, step)
        # The checkpoint may be deleted by now; the step is what counts.
        outcome = info.outcome() if info is not None and info.job_id == request.job_id else JobOutcome(step=step)

        def record() -> None:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.job_key(request.job_id), mapping={
                    "status": "succeeded", "step": step, "finished_at": repr(time.time()),
                    "result": msgspec.msgpack.encode(outcome),
                })
                pipe.expire(keys.job_key(request.job_id), keys.JOB_TTL_S)
                pipe.delete(keys.payload_key(request.job_id), keys.job_lease_key(request.job_id))
                pipe.srem(keys.queue_running_key(self.queue), request.job_id)
                pipe.publish(keys.job_channel(request.job_id), "succeeded")
                pipe.execute()

        self._retry_redis(record, f"recording job {request.job_id}")

    def _hand_back(self, request: TrainRequest, claim: Claim, delivery_tag: str, why: str, *,
                   superseded: bool = False) -> None:
        """Put this delivery back at the front of the queue, for the worker that leads it now.

        A job another delivery took over (``superseded``) is that delivery's: nothing is touched.
        """
        self.trainer.forget()
        job_id = request.job_id
        if superseded:
            log.warning("job %s: %s; leaving it to the delivery that has it", job_id, why)
            return
        marked = self._retry_redis(partial(
            self.redis.eval, REQUEUED_SCRIPT, 4, keys.job_key(job_id), keys.job_channel(job_id),
            keys.queue_running_key(self.queue), keys.job_lease_key(job_id),
            job_id, self.worker_id, claim.attempt, repr(time.time()),
        ), f"handing job {job_id} back")
        moved = bool(delivery_tag) and self._retry_redis(
            partial(broker.requeue_front, self.redis, self.layout, delivery_tag, self.queue),
            f"handing job {job_id} back")
        log.warning("job %s handed back (%s): record %s, message %s", job_id, why,
                    "queued" if marked else "unchanged", "at the front of the queue" if moved else "not held")

    def _record_keys(self, job_id: str) -> tuple[str, ...]:
        return (
            keys.job_key(job_id), keys.job_channel(job_id), keys.queue_token_key(self.queue),
            keys.queue_running_key(self.queue), keys.job_lease_key(job_id), keys.payload_key(job_id),
        )

    def _retry_redis(self, action: Callable[[], T], what: str) -> T:
        """Run ``action``, riding out an unreachable Redis for up to ``redis_retry_s``; then its error is raised."""
        retrying = Retrying(**redis_retrying(what, log, stop_after_delay(self.redis_retry_s)))
        return retrying(action)


def _step_change(request: TrainRequest, claim: Claim, outcome: JobOutcome) -> tuple[str, str]:
    """The commit's compare-and-set: (expected step, new step), '' meaning none / unchanged."""
    current = "" if claim.step is None else str(claim.step)
    if request.kind == "train":
        if outcome.step != (claim.step or 0) + 1:
            raise AssertionError(f"job {request.job_id} made step {outcome.step} on top of step {current}")
        return current, str(outcome.step)
    if request.kind == "register" and claim.step is None:
        return "", str(outcome.step)
    return current, ""


def _events_for(request: TrainRequest, outcome: JobOutcome, *, committed: bool) -> list[CheckpointEvent]:
    ref = request.model

    def event(kind: str, step: int, path: str) -> CheckpointEvent:
        return CheckpointEvent(kind=kind, project=ref.project, model=ref.name, step=step, path=path,  # type: ignore[arg-type]
                               job_id=request.job_id, base_model=ref.base_model, created_at=time.time())

    if request.kind == "delete_checkpoints":
        return [event("deleted", step, "") for step in outcome.deleted_steps]
    if not committed:
        return []  # re-registering a model: its checkpoints were announced when made
    return [event("saved", outcome.step, outcome.checkpoint_path or "")]


def _stream_fields(event: CheckpointEvent) -> dict[str, str]:
    return {name: str(value) for name, value in msgspec.structs.asdict(event).items()}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
