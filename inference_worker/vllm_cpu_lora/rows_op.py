"""lora_op.cpp built with ``torch.utils.cpp_extension`` and loaded into torch as ``torch.ops.trainq_rows``.

The op a ``--compile-lora`` graph calls for each LoRA layer (``compilation``):
it calls lora_rows.c (``rows_kernel``) from C++ for as long as the step and
the layer the Python op last published hold, and the Python op otherwise.
cpp_extension supplies what a build against torch needs: torch's headers and
libraries, its C++ ABI flag, an incremental ninja build, and a lock so that
vLLM's processes starting at once build it once (~5 s). It builds into
``$TRAINQ_KERNEL_CACHE``, one folder per torch version (the op is built
against its headers). Without a C++ compiler (``$CXX``, else ``c++``) or
ninja, the graph calls the Python op instead, with one warning.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from inference_worker.vllm_cpu_lora import rows_kernel

log = logging.getLogger("vllm.plugins.trainq")

__all__ = ["NAME", "build_folder", "load_op"]

SOURCE = Path(__file__).with_name("lora_op.cpp")
NAME = "trainq_rows"  # the library's torch.ops namespace (TORCH_LIBRARY in lora_op.cpp), and the build's name


@cache
def load_op() -> bool:
    """Build lora_op.cpp and load it into torch (``torch.ops.trainq_rows``); False where it cannot (logged once).

    The op calls the kernel ``rows_kernel.load`` built, so it needs that too,
    and a C++ compiler that can build against torch's headers.
    """
    library = rows_kernel.load()
    if library is None:
        return False
    if not _loaded():
        try:
            _build_and_load()
        except rows_kernel.BUILD_ERRORS as exc:
            log.warning("trainq: LoRA op unavailable, the compiled graph's LoRA layers call Python (%s)",
                        rows_kernel.why_failed(exc))
            return False
    import torch

    address = ctypes.cast(library.trainq_lora_rows, ctypes.c_void_p).value
    torch.ops.trainq_rows.set_kernel(address, rows_kernel.SPLIT_ROWS)  # the op's batches stay below the threads' split
    return True


def _loaded() -> bool:
    """Whether this process loaded the op already: a second build of it could not register its ops again."""
    import torch

    return any(Path(path).name.startswith(NAME) for path in torch.ops.loaded_libraries)


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:  # said once, here, rather than as cpp_extension's ABI warning and then its error
        raise FileNotFoundError(f"no C++ compiler {compiler!r}")
    folder = build_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with _only_builder(folder):
        cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=["-O2"], build_directory=str(folder),
                           is_python_module=False)


def build_folder() -> Path:
    """Where lora_op.cpp is built: one folder per torch version, as the op is built against its headers."""
    import torch

    return rows_kernel.cache_dir() / f"lora_op-torch{torch.__version__}"


@contextmanager
def _only_builder(folder: Path) -> Iterator[None]:
    """This process alone builds or loads in ``folder`` meanwhile, and cpp_extension's lock is never a dead one's.

    cpp_extension marks a build in progress with a ``lock`` file that other
    processes wait on until it is removed; a build killed midway (vLLM's
    processes are stopped with SIGKILL after a grace period) leaves it, and
    every later start would wait forever. Under this ``flock``, which the
    kernel releases when its holder dies, a ``lock`` file can only be such a
    leftover, and is removed.
    """
    with open(folder / "trainq.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
