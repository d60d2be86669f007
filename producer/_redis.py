"""The boundary to redis-py: clients are made here and its errors become trainq's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from producer.errors import BackendUnavailableError


def connect(redis_url: str) -> aioredis.Redis:
    """An asyncio client; ``rediss://`` and passwords in the URL work as redis-py reads them."""
    return aioredis.Redis.from_url(redis_url, health_check_interval=30, socket_connect_timeout=5)


@contextmanager
def translated_errors(what: str) -> Iterator[None]:
    """Re-raise Redis connection trouble as ``BackendUnavailableError`` (retryable)."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise BackendUnavailableError(f"{what}: Redis is unreachable ({exc})") from exc
    except redis_errors.AuthenticationError as exc:  # pragma: no cover - subclass of ConnectionError
        raise BackendUnavailableError(f"{what}: Redis refused the credentials ({exc})") from exc
