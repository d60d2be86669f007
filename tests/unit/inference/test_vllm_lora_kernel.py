"""lora_rows.c's build: once per machine and source, atomically, and a clear way out without a compiler."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_worker import vllm_lora_kernel


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TRAINQ_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv(vllm_lora_kernel.KERNEL_FLAG, raising=False)
    monkeypatch.delenv("CC", raising=False)
    vllm_lora_kernel.load.cache_clear()
    yield tmp_path
    vllm_lora_kernel.load.cache_clear()  # later tests build (or reuse) the kernel in the default cache


def test_builds_once_and_reuses_the_library(cache_dir: Path) -> None:
    assert vllm_lora_kernel.load() is not None
    [built] = cache_dir.iterdir()
    assert built.suffix == ".so" and built.name.startswith("lora_rows-")
    first_build = built.stat().st_mtime_ns

    vllm_lora_kernel.load.cache_clear()  # as a new vLLM process would
    assert vllm_lora_kernel.load() is not None
    assert [p.name for p in cache_dir.iterdir()] == [built.name]  # no partial file left, nothing rebuilt
    assert built.stat().st_mtime_ns == first_build


def test_another_cpu_gets_its_own_build(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-march=native code of one CPU may not run on another sharing the cache: the CPU's flags are in the name."""
    assert vllm_lora_kernel.load() is not None
    monkeypatch.setattr(vllm_lora_kernel, "_cpu_flags", lambda: b"flags : fpu sse2")
    vllm_lora_kernel.load.cache_clear()
    assert vllm_lora_kernel.load() is not None
    assert len(list(cache_dir.iterdir())) == 2


def test_turned_off_by_its_flag(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_lora_kernel.KERNEL_FLAG, "0")
    assert vllm_lora_kernel.load() is None
    assert not list(cache_dir.iterdir())


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_torch_serves(cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture, compiler: str) -> None:
    monkeypatch.setenv("CC", compiler)
    with caplog.at_level(logging.WARNING, logger="vllm.plugins.trainq"):
        assert vllm_lora_kernel.load() is None
    assert "LoRA rows kernel unavailable, torch ops serve every batch" in caplog.text
    assert not list(cache_dir.iterdir())


def test_a_failed_compile_names_the_compilers_error(cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path_factory.mktemp("src") / "lora_rows.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(vllm_lora_kernel, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger="vllm.plugins.trainq"):
        assert vllm_lora_kernel.load() is None
    assert "error" in caplog.text and "lora_rows.c" in caplog.text
    assert not list(cache_dir.iterdir())  # the partial output is removed


def test_without_a_cxx_compiler_the_compiled_graph_calls_python(cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CXX", "false")
    vllm_lora_kernel.load_op.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.plugins.trainq"):
            assert vllm_lora_kernel.load_op() is False
    finally:
        vllm_lora_kernel.load_op.cache_clear()  # later tests load the op built in the default cache
    assert "LoRA op unavailable, the compiled graph's LoRA layers call Python" in caplog.text
    [built] = cache_dir.iterdir()  # the kernel, which the op needs, and no partial op
    assert built.name.startswith("lora_rows-")
