"""The worker registry's liveness rule, and the Redis retry helper both sides share."""

from __future__ import annotations

import logging

import msgspec
import pytest
from redis import exceptions as redis_errors
from tenacity import Retrying, stop_after_attempt

from producer._redis import redis_retrying
from producer.workers import LIVE_BEATS, WorkerInfo, live_on, read_workers


def entry(queue: str, *, heartbeat_s: float = 5.0) -> bytes:
    return msgspec.msgpack.encode(WorkerInfo(base_model="m", queue=queue, pid=1, started_at=0.0,
                                             worker_id="id", heartbeat_s=heartbeat_s))


def test_a_worker_is_live_until_it_missed_three_heartbeats() -> None:
    now = 1000.0
    registry = {b"fresh@a": entry("q1"), b"stale@b": entry("q1"), b"never@c": entry("q1"),
                b"other@d": entry("q2"), b"garbage@e": b"\xc1"}
    heartbeats = {b"fresh@a": b"999.0", b"stale@b": str(now - LIVE_BEATS * 5.0 - 0.1).encode(), b"other@d": b"998"}
    workers = read_workers(registry, heartbeats, now)
    assert [w.hostname for w in workers] == ["fresh@a", "never@c", "other@d", "stale@b"], "garbage skipped"
    assert {w.hostname: w.live for w in workers} == {"fresh@a": True, "never@c": False, "other@d": True,
                                                      "stale@b": False}
    assert [w.hostname for w in live_on(workers, "q1")] == ["fresh@a"]
    assert workers[0].describe() == "fresh@a serves 'm' (queue q1)"


def test_the_retry_helper_rides_out_unreachable_redis_and_nothing_else() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis_errors.ConnectionError("refused")
        return "ok"

    log = logging.getLogger("test")
    policy = redis_retrying("testing", log, stop_after_attempt(5))
    assert Retrying(**{**policy, "wait": lambda _: 0})(flaky) == "ok" and len(calls) == 3

    def broken() -> None:
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        Retrying(**{**policy, "wait": lambda _: 0})(broken)
    with pytest.raises(redis_errors.TimeoutError):
        Retrying(**{**redis_retrying("testing", log, stop_after_attempt(2)), "wait": lambda _: 0})(
            lambda: (_ for _ in ()).throw(redis_errors.TimeoutError("slow")))
