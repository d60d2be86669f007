"""``QueueBackend``: trains through a deployed stack (Redis, Celery trainer worker, vLLM)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
import msgspec

from producer import keys
from producer._redis import connect, translated_errors
from producer.backend import Backend, TrainOptions, build_config
from producer.defaults import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_PATH
from producer.errors import BackendUnavailableError, NoWorkerError, PayloadTooLargeError
from producer.jobs import WORKER_GRACE_S, JobListener, TrainJob
from producer.queue import build_celery_app
from producer.types import (
    JobKind,
    ModelRef,
    QueueTrainResult,
    TrainConfig,
    TrainRequest,
    TrajectoryGroup,
)
from producer.validation import encode_groups
from producer.workers import live_on, read_workers

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Unpack

    from celery import Celery

    from producer.model import TrainableModel

__all__ = ["QueueBackend"]

log = logging.getLogger(__name__)

WORKER_WAIT_S = 5.0


class QueueBackend(Backend):
    """Submit train jobs to a trainq stack over Redis.

    Args:
        redis_url: the stack's Redis (``redis://`` or ``rediss://``, with the password if any).
        inference_base_url: the inference worker's OpenAI-compatible URL (``http://host:8000/v1``),
            given to registered models for ``model.openai_client()``.
        inference_api_key: the inference worker's API key.
        path: where ``model.log`` writes trajectories and ``history.jsonl``.
        max_payload_bytes: encoded groups larger than this are refused before anything is queued.
        payload_ttl_s: how long a queued job's groups wait in Redis for a worker.
        serve_timeout_s: ``register`` and ``train`` return once the inference worker lists
            the new ``name@step`` (about 50 ms after the checkpoint), so the next rollouts can
            ask for it at once; after this many seconds they return anyway and log a warning.
            0 (or no ``inference_base_url``) returns as soon as the step is made.
        worker_wait_s: ``register``, ``train`` and ``delete_checkpoints`` need a live trainer
            worker on the model's queue (``keys.queue_name(base_model)``): without one after this
            many seconds they raise ``NoWorkerError`` naming the queue and the live workers, and
            queue nothing. ``submit_train`` queues all the same, for a worker started later.
        worker_grace_s: a job waited on (``TrainJob.result()``) whose queue has had no live
            worker for this long fails the wait with ``NoWorkerError``; the job stays queued.

    All the handles of one backend wait through one ``JobListener``: one pub/sub
    connection, however many jobs are waited on.
    """

    def __init__(
        self,
        redis_url: str,
        inference_base_url: str | None = None,
        inference_api_key: str | None = None,
        *,
        path: str = DEFAULT_PATH,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        payload_ttl_s: int = keys.JOB_TTL_S,
        serve_timeout_s: float = 60.0,
        worker_wait_s: float = WORKER_WAIT_S,
        worker_grace_s: float = WORKER_GRACE_S,
    ) -> None:
        self.redis_url = redis_url
        self.inference_base_url = inference_base_url
        self.inference_api_key = inference_api_key
        self.path = path
        self.max_payload_bytes = max_payload_bytes
        self.payload_ttl_s = payload_ttl_s
        self.serve_timeout_s = serve_timeout_s
        self.worker_wait_s = worker_wait_s
        self._redis = connect(redis_url)
        self._listener = JobListener(self._redis, worker_grace_s=worker_grace_s)
        self._celery: Celery | None = None
        # One thread sends to the broker, so the broker's connection pool holds one connection.
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainq-send")

    # ------------------------------------------------------------------ public

    async def register(self, model: TrainableModel) -> None:
        await self._prepare(model)
        model._attach(self)
        await self._require_worker(model)
        job = await self._submit(model, "register")
        outcome = await job.result()
        model._set_step(outcome.step)
        await self.wait_served(model, outcome.step)

    async def submit_train(
        self, model: TrainableModel, groups: Iterable[TrajectoryGroup], **options: Unpack[TrainOptions]
    ) -> TrainJob:
        """Queue a train job and return its handle at once, whether or not a worker serves the queue yet."""
        groups = list(groups)
        config, verbose, payload = self._encode_train(groups, options)
        await self._prepare(model)
        return await self._queue_train(model, config, payload, n_groups=len(groups), verbose=verbose)

    async def train(
        self,
        model: TrainableModel,
        groups: Iterable[TrajectoryGroup],
        *,
        timeout: float | None = None,
        **options: Unpack[TrainOptions],
    ) -> QueueTrainResult:
        groups = list(groups)
        config, verbose, payload = self._encode_train(groups, options)
        await self._prepare(model)
        await self._require_worker(model)
        job = await self._queue_train(model, config, payload, n_groups=len(groups), verbose=verbose)
        result = await self.collect(model, job, timeout=timeout)
        if verbose:
            _say(f"job {job.job_id}: step {result.step} of {model.project}/{model.name} "
                 f"(queued {result.queued_s:.1f} s, trained {result.train_s:.1f} s); served")
        return result

    async def collect(self, model: TrainableModel, job: TrainJob, *, timeout: float | None = None) -> QueueTrainResult:
        """Wait for ``model``'s train ``job``; afterwards its step is the model's latest, and it is served."""
        result = await job.result(timeout=timeout)
        model._set_step(result.step)
        await self.wait_served(model, result.step)
        return result

    def job(self, job_id: str) -> TrainJob:
        """The handle of a job submitted earlier, from this process or any other."""
        return TrainJob(self._redis, job_id, self._listener)

    async def get_step(self, model: TrainableModel) -> int:
        await self._prepare(model)
        with translated_errors(f"reading the step of {model.project}/{model.name}"):
            step = await self._redis.hget(keys.model_key(model.project, model.name), "step")
        if step is None:
            raise LookupError(f"model {model.project}/{model.name} is not registered; call model.register(backend)")
        model._set_step(int(step))
        return int(step)

    async def delete_checkpoints(self, model: TrainableModel, keep_steps: list[int]) -> list[int]:
        await self._prepare(model)
        await self._require_worker(model)
        job = await self._submit(model, "delete_checkpoints", keep_steps=sorted(set(keep_steps)))
        await job.result()
        outcome = (await job.record()).outcome
        return outcome.deleted_steps if outcome else []

    async def wait_served(self, model: TrainableModel, step: int) -> bool:
        """Wait until the inference worker lists ``name@step``; ``False`` if it did not within ``serve_timeout_s``."""
        if self.inference_base_url is None or self.serve_timeout_s <= 0:
            return False
        name = model.get_inference_name(step)
        headers = {"Authorization": f"Bearer {self.inference_api_key}"} if self.inference_api_key else {}
        deadline = time.monotonic() + self.serve_timeout_s
        async with httpx.AsyncClient(base_url=self.inference_base_url, headers=headers, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if name in await _served_models(client):
                    return True
                await asyncio.sleep(0.05)
        log.warning("%s is not served by %s after %.0f s", name, self.inference_base_url, self.serve_timeout_s)
        return False

    async def close(self) -> None:
        await self._close_models()
        await self._listener.aclose()
        await self._redis.aclose()
        if self._celery is not None:
            await asyncio.get_running_loop().run_in_executor(self._sender, self._celery.close)
            self._celery = None
        self._sender.shutdown(wait=False)

    # ---------------------------------------------------------------- internal

    async def _prepare(self, model: TrainableModel) -> None:
        """Called before a call's first I/O for ``model``; a subclass may start services here."""

    def _encode_train(
        self, groups: list[TrajectoryGroup], options: TrainOptions
    ) -> tuple[TrainConfig, bool, bytes]:
        """The job's config, ``verbose`` and payload, checked before any I/O: a bad field is a ``ValueError`` naming it."""
        config, verbose = build_config(dict(options))
        payload = encode_groups(groups, allow_missing_logprobs=config.allow_training_without_logprobs)
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLargeError(
                f"the encoded groups are {len(payload):,} bytes, over max_payload_bytes={self.max_payload_bytes:,}; "
                "split them over several train calls"
            )
        return config, verbose, payload

    async def _queue_train(
        self, model: TrainableModel, config: TrainConfig, payload: bytes, *, n_groups: int, verbose: bool
    ) -> TrainJob:
        job = await self._submit(model, "train", config=config, payload=payload)
        if verbose:
            _say(f"job {job.job_id} queued for {model.project}/{model.name}: {n_groups} groups, {len(payload):,} bytes")
        return job

    async def _require_worker(self, model: TrainableModel) -> None:
        """Return once a live worker serves ``model``'s queue; ``NoWorkerError`` after ``worker_wait_s``."""
        queue = keys.queue_name(model.base_model)
        deadline = time.monotonic() + self.worker_wait_s
        while True:
            with translated_errors(f"looking for a worker on {queue}"):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hgetall(keys.WORKERS_KEY)
                    pipe.hgetall(keys.WORKER_HEARTBEATS_KEY)
                    registry, heartbeats = await pipe.execute()
            workers = read_workers(registry, heartbeats, time.time())
            if live_on(workers, queue):
                return
            if time.monotonic() >= deadline:
                live = [w.describe() for w in workers if w.live]
                raise NoWorkerError(queue, live, waited_s=self.worker_wait_s, base_model=model.base_model)
            await asyncio.sleep(min(0.5, self.worker_wait_s))

    async def _submit(
        self,
        model: TrainableModel,
        kind: JobKind,
        *,
        config: TrainConfig | None = None,
        payload: bytes | None = None,
        keep_steps: list[int] | None = None,
    ) -> TrainJob:
        ref = ModelRef(project=model.project, name=model.name, base_model=model.base_model).validate()
        job_id = uuid.uuid4().hex
        queue = keys.queue_name(ref.base_model)
        now = time.time()
        request = TrainRequest(
            job_id=job_id,
            kind=kind,
            model=ref,
            config=config or TrainConfig(),
            payload_key=keys.payload_key(job_id) if payload is not None else None,
            payload_bytes=len(payload or b""),
            submitted_at=now,
            keep_steps=keep_steps or [],
        )
        await self._write_record(request, queue, payload)
        try:
            await asyncio.get_running_loop().run_in_executor(self._sender, self._send, request, queue)
        except Exception as exc:  # the broker write failed: the record must not say "queued" forever
            await self._fail_unsent(job_id, exc)
            raise BackendUnavailableError(f"could not queue job {job_id}: {exc}") from exc
        return self.job(job_id)

    async def _write_record(self, request: TrainRequest, queue: str, payload: bytes | None) -> None:
        job_key = keys.job_key(request.job_id)
        with translated_errors("queueing a job"):
            async with self._redis.pipeline(transaction=True) as pipe:
                if payload is not None:
                    pipe.set(keys.payload_key(request.job_id), payload, ex=self.payload_ttl_s)
                pipe.hset(
                    job_key,
                    mapping={
                        "status": "queued",
                        "kind": request.kind,
                        "model": request.model.key,
                        "queue": queue,
                        "submitted_at": repr(request.submitted_at),
                        "attempts": 0,
                        # What a worker sends again if the job's message is lost with its worker.
                        "request": msgspec.msgpack.encode(request),
                    },
                )
                pipe.expire(job_key, keys.JOB_TTL_S)
                pipe.zadd(keys.queue_jobs_key(queue), {request.job_id: request.submitted_at})
                await pipe.execute()

    def _send(self, request: TrainRequest, queue: str) -> None:
        if self._celery is None:
            self._celery = build_celery_app(self.redis_url)
        self._celery.send_task(
            keys.TASK_TRAIN,
            args=[msgspec.msgpack.encode(request)],
            queue=queue,
            task_id=request.job_id,
        )

    async def _fail_unsent(self, job_id: str, exc: Exception) -> None:
        try:
            await self._redis.hset(
                keys.job_key(job_id),
                mapping={"status": "failed", "error_type": "BackendUnavailableError", "error": f"not queued: {exc}"},
            )
        except Exception:  # noqa: BLE001 - Redis itself may be what failed; the raise below says so
            pass


def _say(message: str) -> None:
    print(f"trainq: {message}", file=sys.stderr, flush=True)


async def _served_models(client: httpx.AsyncClient) -> set[str]:
    """The model ids the inference server lists; empty while it cannot answer."""
    try:
        response = await client.get("/models")
        response.raise_for_status()
        return {entry["id"] for entry in response.json().get("data", [])}
    except (httpx.HTTPError, ValueError, KeyError):
        return set()
