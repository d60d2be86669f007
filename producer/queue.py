"""The Celery side of the job contract, shared by producers and the trainer worker.

Messages are msgspec-msgpack under their own content type, and it is the only
content type a trainq Celery app accepts: a pickle (or JSON) message is refused
by kombu before any task code runs. The task's single argument is the msgpack
of a ``TrainRequest``; the groups travel beside it under a claim-check key.
"""

from __future__ import annotations

import msgspec
from celery import Celery
from kombu.serialization import register

from producer.keys import TASK_TRAIN

__all__ = ["CONTENT_TYPE", "SERIALIZER", "build_celery_app", "TASK_TRAIN"]

SERIALIZER = "trainq-msgpack"
CONTENT_TYPE = "application/x-trainq-msgpack"

DEFAULT_VISIBILITY_TIMEOUT_S = 6 * 3600
"""How long a taken, unacknowledged job waits before Redis hands it out again.

It must exceed the longest job (a longer job would be handed out twice; the
second run finds the first's checkpoint and makes no step, but wastes a slot).
It is also how long a job waits after its whole worker was killed.
"""


def _register_serializer() -> None:
    register(
        SERIALIZER,
        msgspec.msgpack.encode,
        msgspec.msgpack.decode,
        content_type=CONTENT_TYPE,
        content_encoding="binary",
    )


def build_celery_app(
    redis_url: str, *, visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S, name: str = "trainq"
) -> Celery:
    """A Celery app bound to ``redis_url`` that speaks only trainq's msgpack.

    Job state lives in trainq's own job records (see ``producer.keys.job_key``),
    so Celery keeps no results: one source of truth, atomic cancel, and async
    waiting without Celery's blocking ``AsyncResult.get``.
    """
    _register_serializer()
    app = Celery(name, broker=redis_url, set_as_current=False)
    transport_options = {"visibility_timeout": visibility_timeout_s}
    app.conf.update(
        task_serializer=SERIALIZER,
        result_serializer=SERIALIZER,
        event_serializer=SERIALIZER,
        accept_content=[SERIALIZER],
        result_accept_content=[SERIALIZER],
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
