"""The builds of lora_rows.c and lora_op.cpp: once per machine and source, atomically, and a clear way out without
a compiler."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_worker.vllm_cpu_lora import rows_kernel, rows_op
from inference_worker.vllm_flags import KERNEL_CACHE, VLLMPluginFlag


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(KERNEL_CACHE, str(tmp_path))
    monkeypatch.delenv(VLLMPluginFlag.LORA_KERNEL, raising=False)
    monkeypatch.delenv("CC", raising=False)
    rows_kernel.load.cache_clear()
    yield tmp_path
    rows_kernel.load.cache_clear()  # later tests build (or reuse) the kernel in the default cache


def test_builds_once_and_reuses_the_library(cache_dir: Path) -> None:
    assert rows_kernel.load() is not None
    [built] = cache_dir.iterdir()
    assert built.suffix == ".so" and built.name.startswith("lora_rows-")
    first_build = built.stat().st_mtime_ns

    rows_kernel.load.cache_clear()  # as a new vLLM process would
    assert rows_kernel.load() is not None
    assert [p.name for p in cache_dir.iterdir()] == [built.name]  # no partial file left, nothing rebuilt
    assert built.stat().st_mtime_ns == first_build


def test_another_cpu_gets_its_own_build(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-march=native code of one CPU may not run on another sharing the cache: the CPU's flags are in the name."""
    assert rows_kernel.load() is not None
    monkeypatch.setattr(rows_kernel, "_cpu_flags", lambda: b"flags : fpu sse2")
    rows_kernel.load.cache_clear()
    assert rows_kernel.load() is not None
    assert len(list(cache_dir.iterdir())) == 2


def test_turned_off_by_its_flag(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VLLMPluginFlag.LORA_KERNEL, "0")
    assert rows_kernel.load() is None
    assert not list(cache_dir.iterdir())


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_torch_serves(cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture, compiler: str) -> None:
    monkeypatch.setenv("CC", compiler)
    with caplog.at_level(logging.WARNING, logger="vllm.plugins.trainq"):
        assert rows_kernel.load() is None
    assert "LoRA rows kernel unavailable, torch ops serve every batch" in caplog.text
    assert not list(cache_dir.iterdir())


def test_a_failed_compile_names_the_compilers_error(cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path_factory.mktemp("src") / "lora_rows.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(rows_kernel, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger="vllm.plugins.trainq"):
        assert rows_kernel.load() is None
    assert "error" in caplog.text and "lora_rows.c" in caplog.text
    assert not list(cache_dir.iterdir())  # the partial output is removed


@pytest.fixture
def new_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The op's loader as in a process that has not loaded it yet; cpp_extension's record of builds kept as it was."""
    from torch.utils import cpp_extension

    versioner = cpp_extension.JIT_EXTENSION_VERSIONER  # keyed by name: another folder's build would bump it
    monkeypatch.setattr(versioner, "entries", dict(versioner.entries))
    monkeypatch.setattr(rows_op, "_loaded", lambda: False)
    rows_op.load_op.cache_clear()
    yield
    rows_op.load_op.cache_clear()  # later tests load the op built in the default cache


@pytest.mark.parametrize("compiler", ["/nonexistent/c++", "false"])
def test_without_a_cxx_compiler_the_compiled_graph_calls_python(cache_dir: Path, new_process: None, compiler: str,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CXX", compiler)
    with caplog.at_level(logging.WARNING):
        assert rows_op.load_op() is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # torch's loggers too
    assert len(warnings) == 1 and "LoRA op unavailable, the compiled graph's LoRA layers call Python" in warnings[0]
    [built] = cache_dir.glob("*.so")  # the kernel, which the op needs, and no op
    assert built.name.startswith("lora_rows-") and not list(rows_op.build_folder().glob("*.so"))


@pytest.mark.timeout(180)
def test_a_build_killed_midway_does_not_stop_later_ones(tmp_path: Path) -> None:
    """cpp_extension waits until its ``lock`` file is gone; one that a killed build left behind is removed.

    vLLM's processes are stopped with SIGKILL after a grace period, so a
    build can die holding the lock. A new process, as a restarted vLLM's,
    in the default cache, where the op is built once per machine and torch.
    """
    code = "from inference_worker.vllm_cpu_lora import rows_op; print(rows_op.build_folder())"
    env = {k: v for k, v in os.environ.items() if k != KERNEL_CACHE}
    folder = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True,
                                 env=env).stdout.strip())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()  # as a build killed midway leaves it
    code = "from inference_worker.vllm_cpu_lora import rows_op; assert rows_op.load_op()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=150, env=env)
    assert not (folder / "lock").exists()
