"""lora_rows.c, built for this CPU on first use and called through ctypes.

With each LoRA layer's slices fused (``fused``), torch's ops still cost ~20 us
a layer call in dispatch on a decode step's few rows (casts, two small
matmuls, an add, for a few thousand multiply-adds; 120 calls a step of
SmolLM2-135M), and on a prompt's thousands of rows three passes over float32
intermediates as wide as the layer's output. The C kernel does a layer in one
call, the sums in registers, and shares a batch of ``SPLIT_ROWS`` rows or more
out between threads.

It is compiled with the machine's C compiler (``$CC``, else ``cc``, ``-O3
-march=native``) into ``$TRAINQ_KERNEL_CACHE`` (default
``~/.cache/trainq/kernels``), named by a hash of the source, the flags, the
compiler and the CPU's feature flags. The build writes a temporary file and
renames it into place: several vLLM processes starting at once each get a
whole library. Without a compiler (or with ``TRAINQ_VLLM_LORA_KERNEL=0``)
``load`` returns None and torch's ops serve.

Not ``torch.utils.cpp_extension``, which builds lora_op.cpp (``rows_op``):
this is a C library that needs nothing of torch, loaded with ctypes (whose
function pointer lora_op.cpp is also handed), while cpp_extension compiles
C++ against torch's headers, links libtorch and loads the result as torch ops;
and ``-march=native`` makes the build depend on the CPU, which cpp_extension's
cache (sources and flags) does not key on, so a cache shared between machines
could hand one CPU another's instructions.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

from inference_worker.vllm_flags import KERNEL_CACHE, VLLMPluginFlag, flag_on

log = logging.getLogger("vllm.plugins.trainq")

__all__ = ["BUILD_ERRORS", "SPLIT_ROWS", "RowsKernel", "cache_dir", "load", "open_library", "why_failed"]

SOURCE = Path(__file__).with_name("lora_rows.c")
# Reassociating float32 sums lets the compiler vectorize the dot products; nothing else of fast-math.
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-shared", "-fPIC")

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
# A batch this many rows or more is split between threads: below, a handoff (~30 us) costs more than it saves.
SPLIT_ROWS = 256
# trainq_lora_rows(layer, x, x_stride, rows, y, y_stride, slots, scale): what changes per call; the
# rest is the layer's struct, built once (ctypes converts each argument, ~0.1 us apiece).
ARGTYPES = (_p, _p, _i64, _i64, _p, _i64, _p, ctypes.c_float)
# What a build or a load can fail with: no compiler or a bad library (OSError), no home directory for the
# cache or a failed cpp_extension build (RuntimeError), the compiler's error (CalledProcessError).
BUILD_ERRORS = (OSError, RuntimeError, subprocess.CalledProcessError)


class _Layer(ctypes.Structure):
    _fields_ = [  # lora_rows.c's trainq_lora_layer, field for field
        ("in_features", _i64),
        ("slices", _i64),
        ("width", ctypes.POINTER(_i64)),
        ("shrink", ctypes.POINTER(_p)),
        ("expand", ctypes.POINTER(_p)),
        ("rank", ctypes.POINTER(_i64)),
        ("max_k", _i64),
    ]


class RowsKernel:
    """One LoRA layer as lora_rows.c sees it: its slices' widths and the fused weights of each slot set.

    Tensors are described by address, so the caller keeps every tensor it
    hands over alive and unchanged for as long as it calls: ``set_slot``'s
    weights until the layer is dropped, ``x``, ``y`` and ``slots`` for the call,
    and checks their shapes (``in_features`` columns of ``x``, at least
    ``width`` of ``y``): C reads and writes where the addresses say.
    """

    __slots__ = ("_arrays", "_function", "_layer", "address", "in_features", "width")

    def __init__(self, library: ctypes.CDLL, in_features: int, widths: tuple[int, ...], slots: int,
                 max_rank: int) -> None:
        width = (_i64 * len(widths))(*widths)
        shrink, expand, rank = (_p * slots)(), (_p * slots)(), (_i64 * slots)()
        self._arrays = (width, shrink, expand, rank)  # the struct points into these
        self._layer = _Layer(in_features, len(widths), width, shrink, expand, rank, len(widths) * max_rank)
        self.address = ctypes.addressof(self._layer)
        self._function = library.trainq_lora_rows
        self.in_features, self.width = in_features, sum(widths)

    def set_slot(self, slot: int, shrink_address: int, expand_address: int, rank: int) -> None:
        """Slot ``slot``'s fused weights, bfloat16, contiguous: every slice's A stacked, ``(n*rank, in)``, and
        each slice's B.T side by side, ``(rank, sum(widths))``."""
        _, shrink, expand, ranks = self._arrays
        shrink[slot], expand[slot], ranks[slot] = shrink_address, expand_address, rank

    def __call__(self, x: int, x_stride: int, rows: int, y: int, y_stride: int, slots: int, scale: float) -> None:
        """Add the update of ``rows`` bfloat16 rows of ``x`` into ``y``, each with the slot ``slots`` (int64) names.

        Every slot a row names must have been set; rows of slot -1 are
        skipped. A batch of ``SPLIT_ROWS`` rows or more is shared out between
        this thread and helper threads (ctypes lets go of the GIL for the call).
        """
        parts = min(len(_CPUS), rows // SPLIT_ROWS)
        if parts <= 1:
            self._run(x, x_stride, rows, y, y_stride, slots, scale)
            return
        share = -(-rows // parts)
        helpers = [
            _helpers().submit(self._run, x + start * x_stride * 2, x_stride, min(share, rows - start),
                              y + start * y_stride * 2, y_stride, slots + start * 8, scale)
            for start in range(share, rows, share)  # bf16 rows of x and y, int64 slots
        ]
        try:
            self._run(x, x_stride, share, y, y_stride, slots, scale)
        finally:  # never return (or raise) while a helper still writes into y
            for helper in helpers:
                helper.result()

    def _run(self, x: int, x_stride: int, rows: int, y: int, y_stride: int, slots: int, scale: float) -> None:
        if self._function(self.address, x, x_stride, rows, y, y_stride, slots, scale) != 0:
            raise MemoryError("trainq: lora_rows.c could not allocate its scratch memory")


# The CPUs this process may use, read when vLLM loads the plugin: before vLLM-CPU binds each of its
# compute threads to one core, a binding a new thread would inherit from the one that starts it.
_CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset(range(os.cpu_count() or 1))


_pool: tuple[int, ThreadPoolExecutor] | None = None


def _helpers() -> ThreadPoolExecutor:
    """This process's helper threads: a forked child gets its own, as its parent's threads did not come along."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        def unbind() -> None:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, _CPUS)  # this thread only: free to run on the cores torch's threads leave idle

        threads = max(1, len(_CPUS) - 1)
        _pool = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="trainq-lora-rows", initializer=unbind))
        log.info("trainq: lora_rows.c shares batches of %d rows or more with %d helper thread(s) on CPUs %s",
                 SPLIT_ROWS, threads, sorted(_CPUS))
    return _pool[1]


@cache
def load() -> ctypes.CDLL | None:
    """The built kernel library, or None where it cannot be built (logged once)."""
    if not flag_on(VLLMPluginFlag.LORA_KERNEL, default=True):
        return None
    try:
        library = open_library(build(os.environ.get("CC", "cc"), CFLAGS))
    except BUILD_ERRORS as exc:
        log.warning("trainq: LoRA rows kernel unavailable, torch ops serve every batch (%s)", why_failed(exc))
        return None
    return library


def open_library(path: Path) -> ctypes.CDLL:
    """A build of lora_rows.c, its function's argument types declared (ctypes converts the arguments by them)."""
    library = ctypes.CDLL(str(path))
    function = library.trainq_lora_rows
    function.argtypes = ARGTYPES
    function.restype = ctypes.c_int
    return library


def why_failed(exc: Exception) -> object:
    """What a failed build says: the compiler's error output where there is one."""
    return getattr(exc, "stderr", None) or exc


def cache_dir() -> Path:
    """Where the kernel and the op are built: ``$TRAINQ_KERNEL_CACHE``, else ``~/.cache/trainq/kernels``."""
    return Path(os.environ.get(KERNEL_CACHE) or Path.home() / ".cache" / "trainq" / "kernels")


def build(compiler: str, flags: tuple[str, ...]) -> Path:
    """``SOURCE`` built by ``compiler`` with ``flags`` into the cache, once per source, flags, compiler and CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True, text=True).stdout
    parts = [SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(), _cpu_flags()]
    digest = hashlib.sha256(b"\0".join(parts))
    folder = cache_dir()
    target = folder / f"{SOURCE.stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", partial, str(SOURCE)], capture_output=True, check=True, text=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("trainq: built %s at %s", SOURCE.name, target)
    return target


def _cpu_flags() -> bytes:
    """What -march=native depends on: the CPU's feature flags (the machine name where /proc has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.machine().encode()
