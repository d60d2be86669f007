"""The vLLM-CPU plugin is a package of its own (``tests/unit/test_all_exports.py`` checks every module's ``__all__``)."""

from __future__ import annotations

import pkgutil

import inference_worker

MODULES = sorted(info.name for info in pkgutil.walk_packages(inference_worker.__path__, "inference_worker."))


def test_the_vllm_cpu_plugin_is_its_own_package() -> None:
    assert "inference_worker.vllm_cpu_lora.registration" in MODULES
