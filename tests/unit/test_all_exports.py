"""Every public module of the three packages says what it exports, and exports only what it has."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import inference_worker
import producer
import trainer_worker

PACKAGES = (producer, trainer_worker, inference_worker)


def _public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


MODULES = sorted(
    info.name
    for package in PACKAGES
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    if _public(info.name)
) + [package.__name__ for package in PACKAGES]


def _import(name: str) -> object:
    """The module, or a skip where it needs what this machine lacks (vLLM, CUDA) and nothing else failed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing = (exc.name or str(exc)).split(".")[0]
        if missing in ("vllm", "torch") or "CUDA" in str(exc):
            pytest.skip(f"{name} needs {missing}: {exc}")
        raise


def test_every_package_is_walked() -> None:
    assert {"producer.types.rollouts", "trainer_worker.core.loss", "inference_worker.watcher"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_each_public_module_lists_its_public_names(name: str) -> None:
    module = _import(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__ list"
    assert [n for n in exported if not hasattr(module, n)] == [], f"{name}.__all__ names what it does not have"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
