"""The local stack on the embedded default model (SmolLM2-135M), once for the tests of this folder.

What users run: ``LocalBackend`` starts Redis, a trainer worker and an inference
worker (vLLM on the CPU) for ``trainq/smollm2-135m-instruct``; each test
reaches it as ART code does, through a ``LocalBackend`` on the same path,
which reuses the running stack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from producer.base_models import EMBEDDED_DEFAULT
from producer.local_backend import LocalBackend


@pytest.fixture(scope="package")
async def stack_path(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    path = str(tmp_path_factory.mktemp("embedded-stack"))
    owner = LocalBackend(path, base_model=EMBEDDED_DEFAULT, progress=False)
    await owner.start()
    yield path
    await owner.close()
