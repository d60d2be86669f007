"""A real trainer worker (its own process) on the tiny model, shared by a test module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from producer import QueueBackend, TrainableModel
from tests.support.services import WorkerProcess, start_trainer_worker


@pytest.fixture(scope="module")
def worker(redis_url: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = start_trainer_worker(redis_url, str(tiny_model), tmp_path_factory.mktemp("trainer"))
    yield proc
    proc.stop()


@pytest.fixture
async def backend(redis_url: str, tmp_path: Path) -> AsyncIterator[QueueBackend]:
    async with QueueBackend(redis_url, path=str(tmp_path / "logs")) as backend:
        yield backend


_counter = iter(range(10**6))


@pytest.fixture
async def model(backend: QueueBackend, worker: WorkerProcess) -> TrainableModel:
    """A freshly registered model (a new name per test, so steps start at 0)."""
    model = TrainableModel(f"m{next(_counter)}", "itest", base_model=worker.base_model)
    await model.register(backend)
    return model
