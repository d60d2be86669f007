"""Bad input is a clear error and loses nothing: the worker lives and the next good job succeeds."""

from __future__ import annotations

import math

import msgspec
import pytest

from producer import JobFailedError, QueueBackend, TrainableModel, keys
from producer.queue import build_celery_app
from producer.types import ModelRef, TrainRequest
from tests.support.groups import make_group, make_groups
from tests.support.services import WorkerProcess

pytestmark = pytest.mark.slow


async def _next_good_job_succeeds(backend: QueueBackend, model: TrainableModel, worker: WorkerProcess) -> None:
    before = await model.get_step()
    result = await backend.train(model, make_groups(1), timeout=120)
    assert result.step == before + 1
    assert worker.proc.poll() is None


@pytest.mark.parametrize("reward", [math.nan, math.inf, -math.inf])
async def test_non_finite_reward_is_refused_before_queueing(backend: QueueBackend, model: TrainableModel,
                                                             reward: float) -> None:
    groups = [make_group(rewards=[0.0, reward])]
    with pytest.raises(ValueError, match=r"groups\[0\]\.trajectories\[1\]\.reward: must be a finite number, got "):
        await backend.train(model, groups)


async def test_mismatched_logprobs_are_refused(backend: QueueBackend, model: TrainableModel) -> None:
    groups = make_groups(1)
    groups[0].trajectories[0].messages_and_choices[-1].logprobs.pop()
    with pytest.raises(ValueError, match=r"logprobs: 7 logprobs for 8 token_ids"):
        await backend.train(model, groups)


async def test_empty_group_list_is_refused(backend: QueueBackend, model: TrainableModel) -> None:
    with pytest.raises(ValueError, match="at least one trajectory group"):
        await backend.train(model, [])


@pytest.mark.parametrize("name", ["a/b", "..", "../etc", ".hidden", "", "x" * 65])
def test_unsafe_model_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        TrainableModel(name, "proj", base_model="m")


async def test_unknown_keyword_is_a_type_error_at_the_call(backend: QueueBackend, model: TrainableModel) -> None:
    with pytest.raises(TypeError, match="learning_rat"):
        await backend.train(model, make_groups(1), learning_rat=1e-5)


def _send_raw(redis_url: str, queue: str, argument: object) -> None:
    app = build_celery_app(redis_url)
    app.send_task(keys.TASK_TRAIN, args=[argument], queue=queue)
    app.close()


async def test_bad_messages_on_the_queue_fail_alone(backend: QueueBackend, model: TrainableModel,
                                                      worker: WorkerProcess) -> None:
    """Sent raw, past every producer check: garbage bytes, a wrong type, a request with invalid groups."""
    queue = keys.queue_name(model.base_model)
    _send_raw(backend.redis_url, queue, b"\xc1 not msgpack")
    _send_raw(backend.redis_url, queue, {"job_id": 3})

    job_id = "f" * 32
    ref = ModelRef(project=model.project, name=model.name, base_model=model.base_model)
    import redis

    client = redis.Redis.from_url(backend.redis_url)
    client.hset(keys.job_key(job_id), mapping={"status": "queued", "submitted_at": "0"})
    client.set(keys.payload_key(job_id), msgspec.msgpack.encode([["not a list of trajectories"]]))
    request = TrainRequest(job_id=job_id, kind="train", model=ref, payload_key=keys.payload_key(job_id))
    _send_raw(backend.redis_url, queue, msgspec.msgpack.encode(request))

    # Groups travel as arrays (array_like): the path says where, $[group][field].
    with pytest.raises(JobFailedError, match=r"invalid groups payload: Expected `array`, got `str` - at `\$\[0\]\[0\]`"):
        await backend.job(job_id).result(timeout=60)
    await _next_good_job_succeeds(backend, model, worker)


async def test_message_that_is_not_msgpack_at_all_is_dropped(backend: QueueBackend, model: TrainableModel,
                                                              worker: WorkerProcess) -> None:
    """A body kombu cannot decode (or a pickle) never reaches task code."""
    import pickle

    from kombu import Connection

    queue = keys.queue_name(model.base_model)
    with Connection(backend.redis_url) as conn:
        producer = conn.Producer()
        producer.publish(b"\x00garbage", routing_key=queue, content_type="application/x-trainq-msgpack",
                         content_encoding="binary", headers={"task": keys.TASK_TRAIN, "id": "raw-1"})
        producer.publish(pickle.dumps({"evil": True}), routing_key=queue, content_type="application/x-python-serialize",
                         content_encoding="binary", headers={"task": keys.TASK_TRAIN, "id": "raw-2"})
    await _next_good_job_succeeds(backend, model, worker)
    assert "ContentDisallowed" in worker.log_tail(400) or "Refusing to deserialize" in worker.log_tail(400)
