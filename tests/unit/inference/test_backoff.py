"""How the inference worker waits out failures: vLLM restarts and Redis outages back off, then start over."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from inference_worker import supervisor as supervisor_module
from inference_worker.adapters import AdapterManager
from inference_worker.metrics import InferenceMetrics
from inference_worker.settings import InferenceSettings
from inference_worker.supervisor import VLLMSupervisor
from inference_worker.watcher import CheckpointWatcher
from producer.errors import BackendUnavailableError

COMMON = {"redis_url": "redis://127.0.0.1:1/0", "base_model": "m", "checkpoint_root": "/tmp"}


class Stop(Exception):
    """Ends the loop under test once it has done what the test looks at."""


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The seconds each backoff slept, recorded instead of slept."""
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any) -> None:
        slept.append(round(seconds, 3))
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    yield slept


async def test_vllm_restarts_back_off_per_short_run_and_start_over_after_a_long_one(
    waits: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = InferenceSettings(**COMMON, restart_backoff_s=1.0, restart_backoff_max_s=5.0)
    metrics = InferenceMetrics()
    downs: list[int] = []
    supervisor = VLLMSupervisor(settings, "/m", client=None, metrics=metrics,  # type: ignore[arg-type]
                                on_ready=_nothing, on_down=lambda: downs.append(1))
    # Seconds each life of vLLM lasts: four short ones, a long one, then two short ones.
    lives = iter([1.0, 1.0, 1.0, 1.0, 600.0, 1.0, 1.0])
    clock = [0.0]

    async def serve_once() -> None:
        try:
            clock[0] += next(lives)
        except StopIteration:
            raise Stop from None

    monkeypatch.setattr(supervisor_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(supervisor, "_serve_once", serve_once)
    with pytest.raises(Stop):
        await supervisor.run()

    # 1, 2, 4, then capped at 5; the long run restarts at once and the doubling starts over.
    assert waits == [1.0, 2.0, 4.0, 5.0, 1.0, 2.0]
    assert len(downs) == 7
    assert metrics.vllm_restarts._value.get() == 7


async def test_the_watcher_waits_out_redis_with_doubling_waits_that_start_over_once_it_reads(
    waits: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = CheckpointWatcher("redis://127.0.0.1:1/0", AdapterManager.__new__(AdapterManager), InferenceMetrics(),
                                base_models=["m"], checkpoint_root="/tmp")
    # Each read: an outage (raise) or what Redis returned.
    reads: Iterator[Any] = iter(["down"] * 8 + [[]] + ["down"] * 2)

    async def read() -> list[tuple[str, dict[str, Any]]]:
        outcome = next(reads, None)
        if outcome is None:
            raise Stop
        if outcome == "down":
            raise BackendUnavailableError("reading trainq:checkpoints from Redis failed")
        return outcome

    monkeypatch.setattr(watcher, "_read", read)
    try:
        with pytest.raises(Stop):
            await watcher.run()
    finally:
        await watcher.aclose()

    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 0.5, 1.0]


async def _nothing() -> None:
    return None
