"""kombu's private Redis layout, as ``trainer_worker/broker.py`` relies on it: a kombu upgrade that changes it fails here."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis

from producer import keys
from producer.queue import build_celery_app
from trainer_worker import broker

QUEUE = "trainq.test.layout"


@pytest.fixture
def app(redis_url: str) -> Iterator:
    app = build_celery_app(redis_url)
    client = redis.Redis.from_url(redis_url)
    layout = broker.BrokerLayout.from_transport_options(app.conf.broker_transport_options)
    client.delete(QUEUE, layout.unacked, layout.unacked_index)
    yield app
    client.delete(QUEUE, layout.unacked, layout.unacked_index)
    client.close()
    app.close()


def _task_ids(client: redis.Redis, queue: str) -> list[str]:
    """The task ids in ``queue``, front (next to be taken) first."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(queue, 0, -1))]


def test_kombu_keeps_taken_messages_where_broker_py_looks_and_restores_them_as_requeue_front_does(
    app, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    layout = broker.BrokerLayout.from_transport_options(app.conf.broker_transport_options)
    assert (layout.unacked, layout.unacked_index) == ("unacked", "unacked_index")
    for job_id in ("job-first", "job-second"):
        app.send_task(keys.TASK_TRAIN, args=[job_id.encode()], queue=QUEUE, task_id=job_id)
    assert _task_ids(client, layout.queue_list(QUEUE)) == ["job-first", "job-second"], "the right end is the front"

    with app.connection_for_read() as connection:
        channel = connection.default_channel
        taken_at = time.time()
        message = channel.basic_get(QUEUE, no_ack=False)
        tag = message.delivery_tag
        assert message.headers["id"] == "job-first"

        # unacked: tag -> JSON [message, exchange, routing key]; unacked_index: tag -> time taken.
        payload, exchange, routing_key = json.loads(client.hget(layout.unacked, tag))
        assert payload["headers"]["id"] == "job-first"
        assert payload["properties"]["delivery_tag"] == tag
        assert broker.delivery_tag(payload["properties"]) == tag
        assert (exchange, routing_key) == ("", QUEUE)
        assert payload["properties"].get("priority", 0) == 0, "trainq's messages live in the bare queue list"
        assert abs(client.zscore(layout.unacked_index, tag) - taken_at) < 5

        with client.pipeline() as pipe:
            broker.bump_visibility(pipe, layout, [tag, "not-taken"], taken_at + 100)
            pipe.execute()
        assert client.zscore(layout.unacked_index, tag) == pytest.approx(taken_at + 100)
        assert client.zscore(layout.unacked_index, "not-taken") is None, "only taken messages are bumped"

        # kombu's own sweep, once the message is older than the visibility timeout: back at the front.
        client.zadd(layout.unacked_index, {tag: taken_at - 3600})
        channel.qos.restore_visible(num=10, interval=1)
        assert not client.hexists(layout.unacked, tag)
        assert _task_ids(client, layout.queue_list(QUEUE)) == ["job-first", "job-second"]
        restored_by_kombu = json.loads(client.lindex(layout.queue_list(QUEUE), -1))
        assert restored_by_kombu["headers"]["redelivered"] is True
        assert restored_by_kombu["properties"]["delivery_info"]["redelivered"] is True

        again = channel.basic_get(QUEUE, no_ack=False)
        assert again.headers["id"] == "job-first" and again.delivery_tag == tag
        assert broker.requeue_front(client, layout, tag, QUEUE) is True
        assert broker.requeue_front(client, layout, tag, QUEUE) is False, "a message not taken is left alone"
        assert not client.hexists(layout.unacked, tag) and client.zscore(layout.unacked_index, tag) is None
        assert _task_ids(client, layout.queue_list(QUEUE)) == ["job-first", "job-second"]
        assert json.loads(client.lindex(layout.queue_list(QUEUE), -1)) == restored_by_kombu

        # What requeue_front pushed is a message kombu takes again as it was.
        last = channel.basic_get(QUEUE, no_ack=False)
        assert last.headers["id"] == "job-first" and last.body == again.body
    client.close()
