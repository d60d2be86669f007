"""The real stack, once per e2e session: Redis, a trainer worker and an inference worker, each its own process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from producer import QueueBackend, TrainableModel
from tests.integration.inference.worker import API_KEY, InferenceWorker
from tests.support.services import WorkerProcess, start_trainer_worker


@pytest.fixture(scope="package")
def stack_redis_url(redis_url: str) -> str:
    """A database of its own: the stream holds only this scenario's checkpoints."""
    return redis_url.rsplit("/", 1)[0] + "/4"


@pytest.fixture(scope="package")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-checkpoints")


@pytest.fixture(scope="package")
async def inference(stack_redis_url, tiny_model, checkpoint_root, tmp_path_factory) -> AsyncIterator[InferenceWorker]:
    worker = InferenceWorker(
        redis_url=stack_redis_url,
        base_model=tiny_model,
        checkpoint_root=checkpoint_root,
        log_path=tmp_path_factory.mktemp("e2e-logs") / "inference.log",
    )
    yield worker
    await worker.aclose()


@pytest.fixture(scope="package")
def trainer(inference, stack_redis_url, tiny_model, checkpoint_root, tmp_path_factory) -> Iterator[WorkerProcess]:
    """Started after the inference worker, so vLLM's slow start overlaps the trainer's."""
    worker = start_trainer_worker(
        stack_redis_url, str(tiny_model), tmp_path_factory.mktemp("e2e-trainer"), checkpoint_root=checkpoint_root
    )
    yield worker
    worker.stop()


@pytest.fixture
async def backend(stack_redis_url, inference, trainer, tmp_path) -> AsyncIterator[QueueBackend]:
    async with QueueBackend(
        stack_redis_url, inference_base_url=f"{inference.base_url}/v1", inference_api_key=API_KEY, path=str(tmp_path)
    ) as backend:
        yield backend


async def register_and_serve(model: TrainableModel, backend: QueueBackend, inference: InferenceWorker) -> None:
    """Register ``model`` and wait until the inference worker serves its step 0 (``name@0``)."""
    await model.register(backend)
    await inference.wait_models({model.get_inference_name(0)}, timeout=180)
