"""Every inference_worker module says what it exports, and exports only what it has."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import inference_worker

MODULES = sorted(info.name for info in pkgutil.walk_packages(inference_worker.__path__, "inference_worker."))


def test_the_vllm_cpu_plugin_is_its_own_package() -> None:
    assert "inference_worker.vllm_cpu_lora.registration" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_each_module_lists_its_public_names(name: str) -> None:
    if name.startswith("inference_worker.vllm_cpu_lora"):
        pytest.importorskip("vllm", reason="the vLLM-CPU plugin's modules import vLLM's")
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
    assert [n for n in module.__all__ if not hasattr(module, n)] == []
