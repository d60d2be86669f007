"""The Celery side of the job contract, shared by producers and the trainer worker.

Messages are msgspec-msgpack under their own content type, and it is the only
content type a trainq Celery app accepts: a pickle (or JSON) message is refused
by kombu before any task code runs. The task's single argument is the msgpack
of a ``TrainRequest``; the groups travel beside it under a claim-check key.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
from celery import Celery
from kombu.serialization import register

from producer.keys import TASK_TRAIN

__all__ = ["CONTENT_TYPE", "SERIALIZER", "build_celery_app", "TASK_TRAIN"]

SERIALIZER = "trainq-msgpack"
CONTENT_TYPE = "application/x-trainq-msgpack"

DEFAULT_VISIBILITY_TIMEOUT_S = 60.0
"""How long kombu leaves a taken, unacknowledged message alone before handing it out again.

A backstop only: a trainer worker moves the clock of every message it holds
forward a few times a lease (``trainer_worker/liveness.py``), so a live job is
never handed out again however long it runs, and a dead worker's job comes back
through its lapsed lease. What is left to the timeout is a message whose worker
died between taking it and recording that it did (milliseconds), and a lost
acknowledgement (the copy is skipped). kombu's sweep covers every queue of the
Redis database, so the shortest timeout among the workers applies to all.
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
    transport_options = {
        "visibility_timeout": visibility_timeout_s,
        # kombu hands out again a taken message nobody renews (the backstop above) from a sweep
        # that runs when a worker starts and then every interval * throttle seconds (100 s by
        # default). One sweep is one ZRANGE on a small set: run it every few seconds, so such a
        # message waits about visibility_timeout, not up to 100 s more.
        "unacked_restore_interval": min(10.0, max(1.0, visibility_timeout_s / 4)),
        "unacked_restore_throttle": 1,
    }
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
        broker_use_ssl=broker_ssl_options(redis_url),
    )
    return app


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def broker_ssl_options(redis_url: str) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` URL for kombu, read as redis-py reads them; ``None`` for ``redis://``.

    The server's certificate is verified unless the URL says ``ssl_cert_reqs=none``
    (kombu on its own would skip verification for a bare ``rediss://``); a private
    CA is given with ``ssl_ca_certs=/path/ca.pem``, a client certificate with
    ``ssl_certfile`` and ``ssl_keyfile``.
    """
    parts = urlsplit(redis_url)
    if parts.scheme != "rediss":
        return None
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs in the Redis URL must be none, optional or required, got {reqs!r}")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs]}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            options[key] = query[key]
    return options
