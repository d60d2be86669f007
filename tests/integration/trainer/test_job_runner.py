"""``JobRunner`` in process, on a real Redis and the tiny model: exactly once, forward-only steps, fencing.

The Celery shell is left out so a delivery can be repeated at will: ``runner.run(raw)``
is what the task does with a message, and calling it again is a redelivery.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from producer import JobStatus, QueueBackend, keys
from producer.types import ModelRef, TrainConfig, TrainRequest
from producer.validation import encode_groups
from tests.support.groups import make_groups
from trainer_worker.jobs import JobRunner

pytestmark = pytest.mark.slow

BASE_MODEL = "tiny-in-process"
QUEUE = keys.queue_name(BASE_MODEL)


@pytest.fixture(scope="module")
def trainer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from trainer_worker.core.trainer import Trainer

    return Trainer(str(tiny_model), str(tmp_path_factory.mktemp("checkpoints")), max_tokens_per_microbatch=256)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def runner(client: redis.Redis, trainer, worker: str) -> JobRunner:
    """A runner for ``worker``, made the queue's leader with a new fencing token (as liveness.py would)."""
    token = client.incr(keys.queue_token_key(QUEUE))
    client.set(keys.queue_leader_key(QUEUE), f"{token} {worker}")
    return JobRunner(client, trainer, base_model=BASE_MODEL, worker_name=worker, worker_id=worker)


async def submit(backend: QueueBackend, model: ModelRef, kind: str = "train", **fields: object) -> bytes:
    """Write a job's record (and payload) as a producer does; return the message a worker would get."""
    job_id = uuid.uuid4().hex
    groups = fields.pop("groups", None) or make_groups(1)
    payload = encode_groups(groups) if kind == "train" else None  # type: ignore[arg-type]
    request = TrainRequest(job_id=job_id, kind=kind, model=model, config=TrainConfig(learning_rate=1e-3),  # type: ignore[arg-type]
                           payload_key=keys.payload_key(job_id) if payload else None,
                           payload_bytes=len(payload or b""), submitted_at=time.time(), **fields)  # type: ignore[arg-type]
    await backend._write_record(request, QUEUE, payload)
    return msgspec.msgpack.encode(request)


def saved(client: redis.Redis, model: ModelRef) -> list[int]:
    return [int(f[b"step"]) for _, f in client.xrange(keys.CHECKPOINT_STREAM)
            if f[b"model"].decode() == model.name and f[b"kind"] == b"saved"]


def model_step(client: redis.Redis, model: ModelRef) -> int:
    return int(client.hget(keys.model_key(model.project, model.name), "step"))


def job_id_of(raw: bytes) -> str:
    return msgspec.msgpack.decode(raw, type=TrainRequest).job_id


def fresh_model() -> ModelRef:
    return ModelRef(project="inproc", name=f"m{uuid.uuid4().hex[:8]}", base_model=BASE_MODEL)


async def two_steps(backend: QueueBackend, worker: JobRunner, model: ModelRef) -> bytes:
    """Register ``model`` and make steps 1 and 2; the message of the job that made step 1."""
    await asyncio.to_thread(worker.run, await submit(backend, model, "register"))
    first = await submit(backend, model)
    await asyncio.to_thread(worker.run, first)
    await asyncio.to_thread(worker.run, await submit(backend, model))
    return first


async def test_a_job_redelivered_after_its_record_expired_and_its_checkpoint_was_deleted_makes_no_second_step(
    client: redis.Redis, trainer, backend: QueueBackend
) -> None:
    model, worker = fresh_model(), runner(client, trainer, "w-a")
    job = await two_steps(backend, worker, model)
    await asyncio.to_thread(worker.run, await submit(backend, model, "delete_checkpoints", keep_steps=[]))
    assert model_step(client, model) == 2

    client.delete(keys.job_key(job_id_of(job)))  # the record expired; the message comes back
    await asyncio.to_thread(worker.run, job)

    assert model_step(client, model) == 2, "the redelivered job made another step"
    assert saved(client, model) == [0, 1, 2], "a second event for the same job"
    assert (await backend.job(job_id_of(job)).result(timeout=5)).step == 1
    assert trainer.latest_step(model) == 2


async def test_a_job_redelivered_after_later_steps_never_moves_the_step_back(
    client: redis.Redis, trainer, backend: QueueBackend
) -> None:
    model, worker = fresh_model(), runner(client, trainer, "w-a")
    first = await two_steps(backend, worker, model)
    # The first job's message comes back with its record saying running and its groups still there,
    # as after a crash between its step and its record.
    first_id = job_id_of(first)
    client.hset(keys.job_key(first_id), "status", "running")
    client.set(keys.payload_key(first_id), encode_groups(make_groups(1)))
    await asyncio.to_thread(worker.run, first)

    assert model_step(client, model) == 2, "the step went back"
    assert saved(client, model) == [0, 1, 2]


async def test_a_writer_that_lost_the_queue_writes_nothing_and_the_new_leader_makes_the_step(
    client: redis.Redis, trainer, backend: QueueBackend
) -> None:
    model, old = fresh_model(), runner(client, trainer, "w-old")
    await asyncio.to_thread(old.run, await submit(backend, model, "register"))
    raw = await submit(backend, model, groups=make_groups(8, n_trajectories=8, n_tokens=256))
    handle = backend.job(job_id_of(raw))
    running = asyncio.create_task(asyncio.to_thread(old.run, raw))
    while await handle.status() is not JobStatus.RUNNING:
        await asyncio.sleep(0.01)
    new = runner(client, trainer, "w-new")  # takes the queue (and a new token) while the old one trains
    await running

    assert await handle.status() is JobStatus.QUEUED, "the fenced writer handed the job back"
    assert model_step(client, model) == 0 and saved(client, model) == [0]
    assert trainer.latest_step(model) == 0, "the fenced writer renamed no step into place"

    await asyncio.to_thread(new.run, raw)
    result = await handle.result(timeout=5)
    assert result.step == 1 and model_step(client, model) == 1 and saved(client, model) == [0, 1]
    token = int(client.get(keys.queue_token_key(QUEUE)))
    from trainer_worker.core import checkpoints

    info = checkpoints.read_info(trainer.checkpoint_root, model.project, model.name, 1)
    assert info.job_id == handle.job_id
    assert msgspec.json.decode((Path(result.checkpoint_path) / "trainq.json").read_bytes())["token"] == token
