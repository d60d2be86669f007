"""Whether the local stack's services are up: each probe answers ``True`` or ``False``, never raises."""

from __future__ import annotations

import os

import httpx
import msgspec
import redis

from producer import keys
from producer._redis import reply_bytes
from producer._stack_record import StackInfo

__all__ = ["inference_ready", "redis_ready", "stack_alive", "trainer_ready"]


def redis_ready(url: str) -> bool:
    """Redis at ``url`` answers PING."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def trainer_ready(redis_url: str, hostname: str) -> bool:
    """The worker announced itself and its training child has loaded the model."""
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
        try:
            raw = client.hget(keys.WORKERS_KEY, hostname)
        finally:
            client.close()
    except redis.RedisError:
        return False
    if raw is None:
        return False
    info = msgspec.msgpack.decode(reply_bytes(raw))
    return isinstance(info, dict) and bool(info.get("ready_at"))


def inference_ready(base_url: str, api_key: str) -> bool:
    """vLLM answers /health and lists its base model (the worker warms it up before that matters)."""
    return _answers_ok(base_url.removesuffix("/v1") + "/health", None) and _answers_ok(base_url + "/models", api_key)


def stack_alive(stack: StackInfo) -> bool:
    """Every recorded process runs and the services answer: safe to reuse."""
    if not all(_pid_alive(pid) for pid in stack.pids.values()):
        return False
    return (
        redis_ready(stack.redis_url)
        and trainer_ready(stack.redis_url, stack.trainer_hostname)
        and inference_ready(stack.inference_base_url, stack.api_key)
    )


def _answers_ok(url: str, api_key: str | None, timeout: float = 2.0) -> bool:
    """``GET url`` answers 200; no answer (not listening yet, timed out) is ``False``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return httpx.get(url, headers=headers, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True
