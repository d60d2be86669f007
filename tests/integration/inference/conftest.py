"""Fixtures of the inference tests: checkpoints written with peft, events XADDed by hand, worker processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis

from producer.keys import CHECKPOINT_STREAM
from tests.integration.inference.adapters import checkpoint_dir, write_adapter
from tests.integration.inference.worker import InferenceWorker, publish_checkpoint

PROJECT = "inftest"


@pytest.fixture(scope="module")
def inference_redis_url(redis_url: str) -> str:
    """A Redis database of these tests' own, so other suites' checkpoint events stay out of the stream."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    with redis.Redis.from_url(url) as client:
        client.delete(CHECKPOINT_STREAM)
    return url


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def make_adapter(tiny_model: Path, checkpoint_root: Path) -> Callable[..., Path]:
    """``make_adapter(model, step, seed)``: a LoRA checkpoint of the tiny model in the trainer's layout."""

    def make(model: str, step: int, *, seed: int, project: str = PROJECT) -> Path:
        return write_adapter(tiny_model, checkpoint_dir(checkpoint_root, project, model, step), seed=seed)

    return make


@pytest.fixture(scope="module")
def publish(inference_redis_url: str, tiny_model: Path) -> Callable[..., str]:
    """``publish(kind, model, step, path, ...)``: XADD a checkpoint event of the tiny base model."""

    def publish_(kind: str, model: str, step: int, path: Path | str, **overrides: object) -> str:
        fields: dict = {"project": PROJECT, "base_model": str(tiny_model), **overrides}
        return publish_checkpoint(inference_redis_url, kind=kind, model=model, step=step, path=path, **fields)

    return publish_


@pytest.fixture(scope="module")
async def start_worker(
    inference_redis_url: str, tiny_model: Path, checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Callable[..., InferenceWorker]]:
    """Start ``python -m inference_worker`` processes; every one is stopped after the module."""
    started: list[InferenceWorker] = []
    logs = tmp_path_factory.mktemp("inference-logs")

    def start(settings: dict[str, str | None] | None = None) -> InferenceWorker:
        worker = InferenceWorker(
            redis_url=inference_redis_url,
            base_model=tiny_model,
            checkpoint_root=checkpoint_root,
            log_path=logs / f"worker-{len(started)}.log",
            settings=settings,
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.aclose()


@pytest.fixture(scope="module")
def worker(start_worker: Callable[[], InferenceWorker]) -> InferenceWorker:
    """The module's main worker; its vLLM starts in the background while tests write checkpoints."""
    first = start_worker()
    first.wait_metrics_port()
    return first
