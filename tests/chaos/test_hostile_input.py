"""Hostile and oversized input against a real trainer worker: refused cleanly, nothing runs, the worker lives.

Also: a producer that vanishes after submitting can collect its result later, by job id.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from producer import JobFailedError, JobStatus, PayloadTooLargeError, QueueBackend, TrainableModel, keys
from producer.queue import build_celery_app
from producer.types import ModelRef, TrainRequest
from producer.validation import encode_groups
from tests.chaos.conftest import RedisServer
from tests.support.groups import make_group, make_groups
from tests.support.services import WorkerProcess, child_env, start_trainer_worker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

WORKER_MAX_PAYLOAD = 64 * 1024
PROJECT = "hostile"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(server: RedisServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = start_trainer_worker(server.url, str(tiny_model), tmp_path_factory.mktemp("trainer"),
                                extra=["--max-payload-bytes", str(WORKER_MAX_PAYLOAD)])
    yield proc
    proc.stop()


@pytest.fixture
async def backend(server: RedisServer, tmp_path: Path) -> AsyncIterator[QueueBackend]:
    async with QueueBackend(server.url, path=str(tmp_path / "logs")) as backend:
        yield backend


_names = iter(range(10**6))


@pytest.fixture
async def model(backend: QueueBackend, worker: WorkerProcess) -> TrainableModel:
    model = TrainableModel(f"h{next(_names)}", PROJECT, base_model=worker.base_model)
    await model.register(backend)
    return model


async def next_good_job_succeeds(backend: QueueBackend, model: TrainableModel, worker: WorkerProcess) -> None:
    child = worker.child_pid
    before = await backend.get_step(model)
    assert (await backend.train(model, [make_group()], timeout=120)).step == before + 1
    assert worker.proc.poll() is None and worker.child_pid == child, "the worker and its child lived"


def send_raw(redis_url: str, queue: str, argument: object) -> None:
    app = build_celery_app(redis_url)
    app.send_task(keys.TASK_TRAIN, args=[argument], queue=queue)
    app.close()


def queue_raw_job(redis_url: str, queue: str, request: bytes, job_id: str, payload: bytes | None) -> None:
    """Put a job on the queue as a producer would, past every producer-side check."""
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.job_key(job_id), mapping={"status": "queued", "submitted_at": repr(time.time())})
    if payload is not None:
        client.set(keys.payload_key(job_id), payload)
    send_raw(redis_url, queue, request)


# ------------------------------------------------------------------ a producer that goes away


async def test_a_producer_that_exits_after_submitting_gets_its_result_later_by_job_id(
    backend: QueueBackend, model: TrainableModel, server: RedisServer
) -> None:
    script = f"""
import asyncio, os
from producer import QueueBackend, TrainableModel
from tests.support.groups import make_groups

async def main():
    backend = QueueBackend({server.url!r})
    model = TrainableModel({model.name!r}, {model.project!r}, base_model={model.base_model!r})
    job = await backend.submit_train(model, make_groups(1))
    print(job.job_id, flush=True)
    os._exit(0)  # gone without closing anything

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=child_env(), cwd=Path(__file__).parents[2], check=True)
    job_id = done.stdout.split()[-1]

    async with QueueBackend(server.url) as later:
        result = await later.job(job_id).result(timeout=120)
    assert result.job_id == job_id
    assert result.step == 1


# ------------------------------------------------------------------------------- size limits


async def test_a_payload_over_the_producer_limit_is_refused_and_nothing_reaches_redis(
    server: RedisServer, model: TrainableModel, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(server.url)
    keys_before = set(client.keys("*"))
    async with QueueBackend(server.url, path=str(tmp_path), max_payload_bytes=4096) as small:
        with pytest.raises(PayloadTooLargeError, match="over max_payload_bytes=4,096"):
            await small.submit_train(model, make_groups(4, n_tokens=64))
    assert set(client.keys("*")) == keys_before


async def test_a_payload_over_the_worker_limit_fails_the_job_before_decoding(
    backend: QueueBackend, model: TrainableModel, worker: WorkerProcess
) -> None:
    big = make_groups(8, n_trajectories=8, n_tokens=256)  # about 150 KB of msgpack, over the worker's 64 KiB
    with pytest.raises(JobFailedError, match="over this worker's --max-payload-bytes=65,536"):
        await backend.train(model, big, timeout=120)
    await next_good_job_succeeds(backend, model, worker)


# -------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", ["../x", "..", "a/../../b"])
async def test_a_raw_request_naming_a_path_outside_the_checkpoint_root_is_rejected(
    backend: QueueBackend, worker: WorkerProcess, name: str
) -> None:
    job_id = os.urandom(16).hex()
    ref = ModelRef(project=PROJECT, name=name, base_model=worker.base_model)  # not validated on purpose
    request = msgspec.msgpack.encode(TrainRequest(job_id=job_id, kind="register", model=ref))
    queue_raw_job(backend.redis_url, keys.queue_name(worker.base_model), request, job_id, None)

    with pytest.raises(JobFailedError, match="InvalidJobError: invalid TrainRequest: invalid model name"):
        await backend.job(job_id).result(timeout=60)
    root = worker.checkpoint_root.resolve()
    assert not (root.parent / "x").exists() and not (root.parent / "b").exists()
    assert all(p.resolve().is_relative_to(root) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------- pickle


class _CreatesAFileWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


async def test_a_pickled_celery_message_is_refused_and_never_unpickled(
    backend: QueueBackend, model: TrainableModel, worker: WorkerProcess, tmp_path: Path
) -> None:
    from celery import Celery

    marker = tmp_path / "unpickled"
    attacker = Celery("attacker", broker=backend.redis_url, set_as_current=False)
    attacker.conf.update(task_serializer="pickle", accept_content=["pickle"])
    attacker.send_task(keys.TASK_TRAIN, args=[_CreatesAFileWhenUnpickled(marker)], queue=keys.queue_name(model.base_model))
    attacker.close()

    await next_good_job_succeeds(backend, model, worker)
    assert not marker.exists(), "the worker unpickled the message"
    log = worker.log_tail(4000)
    assert "ContentDisallowed" in log or "Refusing to deserialize" in log


# ----------------------------------------------------------------------- mutated messages


NASTY_VALUES: list[object] = [None, True, -1, 2**63, 2**64 - 1, -(2**63), 1.5, float("nan"), float("inf"), "",
                              "../x", "x" * 10_000, b"\x00\xff", [], [1, [2, [3]]], {}, {"role": "user"}]


def mutate(valid: bytes, rng: random.Random, keep: tuple = ()) -> bytes:
    """``valid`` decoded, one location (not under ``keep``) replaced by a nasty value or deleted, re-encoded."""
    tree = msgspec.msgpack.decode(valid)

    def locations(node: object, path: tuple) -> list[tuple]:
        found = [path] if path and path[:1] not in keep else []
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in children:
            found += locations(value, (*path, key))
        return found

    path = rng.choice(locations(tree, ()))
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(NASTY_VALUES)
    return msgspec.msgpack.encode(tree)


async def test_a_batch_of_mutated_jobs_through_the_worker_each_ends_cleanly_and_the_worker_lives(
    backend: QueueBackend, model: TrainableModel, worker: WorkerProcess
) -> None:
    rng = random.Random(6)
    queue = keys.queue_name(worker.base_model)
    ref = ModelRef(project=model.project, name=model.name, base_model=model.base_model)
    valid_groups = encode_groups([make_group(n_trajectories=2, n_tokens=4)])
    job_ids = []
    for i in range(40):
        job_id = os.urandom(16).hex()
        request = msgspec.msgpack.encode(
            TrainRequest(job_id=job_id, kind="train", model=ref, payload_key=keys.payload_key(job_id))
        )
        if i % 2:  # a mutated request (its job id kept, so its caller hears of the outcome)
            queue_raw_job(backend.redis_url, queue, mutate(request, rng, keep=(("job_id",),)), job_id, valid_groups)
        else:  # a valid request with mutated groups
            queue_raw_job(backend.redis_url, queue, request, job_id, mutate(valid_groups, rng))
        job_ids.append(job_id)

    outcomes: dict[str, int] = {}
    for job_id in job_ids:
        status = await backend.job(job_id).wait(timeout=120)
        record = await backend.job(job_id).record()
        assert status in (JobStatus.SUCCEEDED, JobStatus.FAILED), (job_id, status)
        if status is JobStatus.FAILED:
            assert record.error_type in ("InvalidJobError", "ValueError", "LookupError"), record
            assert record.error
        key = record.error_type or "succeeded"
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\n40 mutated jobs through the worker: {outcomes}")
    await next_good_job_succeeds(backend, model, worker)
