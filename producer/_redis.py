"""The boundary to redis-py: clients are made here, its errors become trainq's, and Redis restarts are ridden out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from tenacity import RetryCallState, retry_if_exception_type, wait_exponential

from producer.errors import BackendUnavailableError

__all__ = ["MAX_CONNECTIONS", "UNREACHABLE", "connect", "redis_retrying", "reply_bytes", "translated_errors"]

UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, BackendUnavailableError)
"""What a Redis restart raises, on either side of the translation."""

MAX_CONNECTIONS = 6
"""Connections one SDK client opens at most (one of them for the job listener's pub/sub); calls beyond wait."""


def connect(redis_url: str, *, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """An asyncio client on a bounded pool; ``rediss://`` and passwords in the URL work as redis-py reads them.

    The pool blocks instead of growing, so a thousand concurrent calls from one
    process share a few connections; each is named ``trainq-sdk`` in ``CLIENT LIST``.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url, max_connections=max_connections, timeout=None, health_check_interval=30,
        socket_connect_timeout=5, client_name="trainq-sdk",
    )
    return aioredis.Redis.from_pool(pool)


def reply_bytes(reply: bytes | str) -> bytes:
    """A reply of a client without ``decode_responses`` as the bytes it is (redis-py types it bytes or str)."""
    return reply if isinstance(reply, bytes) else reply.encode()


@contextmanager
def translated_errors(what: str) -> Iterator[None]:
    """Re-raise Redis connection trouble as ``BackendUnavailableError`` (retryable)."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise BackendUnavailableError(f"{what}: Redis is unreachable ({exc})") from exc
    except redis_errors.AuthenticationError as exc:  # pragma: no cover - subclass of ConnectionError
        raise BackendUnavailableError(f"{what}: Redis refused the credentials ({exc})") from exc


def redis_retrying(
    what: str,
    log: logging.Logger,
    stop: Callable[[RetryCallState], bool],
    *,
    first_wait_s: float = 0.1,
    max_wait_s: float = 5.0,
) -> dict[str, Any]:
    """tenacity's arguments for riding out a Redis restart, for ``Retrying(**...)`` or ``AsyncRetrying(**...)``.

    Retries while Redis is unreachable, waiting ``first_wait_s``, doubling to
    ``max_wait_s``, until ``stop`` says so; then the last error is raised as it
    was. Each call of the ``Retrying`` starts the waits over.
    """

    def say(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        pause = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: Redis unreachable (%s); retrying in %.1f s", what, error, pause)

    return {
        "retry": retry_if_exception_type(UNREACHABLE),
        "wait": wait_exponential(multiplier=first_wait_s, max=max_wait_s),
        "stop": stop,
        "before_sleep": say,
        "reraise": True,
    }
