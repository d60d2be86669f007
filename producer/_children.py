"""Child processes that never outlive their parent, and process groups stopped as a whole.

Shared by the local stack (``producer/_stack_guard.py``) and the inference
worker's vLLM supervisor: both start services that fork processes of their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

__all__ = ["die_with_parent", "signal_group"]


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it dies, so no child is orphaned (Linux).

    Pass it as ``preexec_fn``; elsewhere than Linux it does nothing.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group ``pgid``; a group already gone (or not ours) is left alone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
