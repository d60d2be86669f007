"""The guard each local stack service runs under, so that stopping a service stops every process it made.

Services leave processes behind that a signal to the service alone does not
reach (Celery's pool child, busy with a job whose Redis is gone, outlives a
cold-shutdown parent; vLLM's engine outlives its API server). A guard leads a
process group of its own, runs the service in it, forwards SIGTERM, and once
the service has exited (or after a grace period) kills the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from producer._children import die_with_parent, signal_group

__all__ = ["GUARD_MAIN", "guard", "spawn_guarded", "terminate"]

_GUARD_GRACE_S = 25.0  # a trainer in warm shutdown may finish its step; vLLM needs ~10 s to exit
_STOP_GRACE_S = _GUARD_GRACE_S + 10.0
_KILLED_WAIT_S = 5.0

GUARD_MAIN = "import sys; from producer._stack_guard import guard; sys.exit(guard(sys.argv[1:]))"
"""The ``python -c`` program of a guard; its arguments are the service's command line."""


def spawn_guarded(cmd: list[str], log_path: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` under a guard, its output appended to ``log_path``.

    The guard leads a session of its own: Ctrl-C in the caller's terminal
    reaches only the caller, which stops the stack in order. The parent-death
    signal stops it too if the caller dies without cleaning up (SIGKILL, crash).
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", GUARD_MAIN, *cmd],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=die_with_parent,
        )


def terminate(process: subprocess.Popen[bytes]) -> None:
    """Stop a guarded service: SIGTERM to its guard, then SIGKILL to the whole group after a grace period."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(_STOP_GRACE_S)
    # The leader's own children (Celery's pool, vLLM's engine) may outlive it: the group goes too.
    signal_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(_KILLED_WAIT_S)


def guard(cmd: list[str]) -> int:
    """Run ``cmd``; on SIGTERM or SIGINT stop it, then everything in this process group, itself last.

    Left alone, it exits with ``cmd``'s code.
    """
    child = subprocess.Popen(cmd)
    stop_requested: list[float] = []

    def request_stop(_signum: int, _frame: object) -> None:
        # Only flag and forward here: waiting inside a handler that interrupted
        # child.wait() would spin on Popen's internal lock until the timeout.
        if not stop_requested:
            stop_requested.append(time.monotonic())
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while True:
        try:
            code = child.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if stop_requested and time.monotonic() - stop_requested[0] > _GUARD_GRACE_S:
                code = -int(signal.SIGKILL)
                break
    if stop_requested:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return code
