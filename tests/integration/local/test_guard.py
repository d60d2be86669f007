"""The guard LocalBackend runs each service under: a stop takes the whole process group down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from producer._stack_guard import GUARD_MAIN


def group_members(pgid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if _running(int(pid))]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


def test_sigterm_stops_the_service_and_what_it_left_behind() -> None:
    # The service exits on SIGTERM at once but leaves a grandchild that ignores it
    # (as Celery's pool child, busy with a job, outlives its parent).
    service = (
        "import signal, subprocess, sys, time\n"
        "subprocess.Popen(['sh', '-c', 'trap \"\" TERM; exec sleep 300'])\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "time.sleep(300)\n"
    )
    guard = subprocess.Popen([sys.executable, "-c", GUARD_MAIN, sys.executable, "-c", service], start_new_session=True)
    deadline = time.monotonic() + 20
    while len(group_members(guard.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(group_members(guard.pid)) >= 3  # guard, service, sleep

    started = time.monotonic()
    guard.send_signal(signal.SIGTERM)
    guard.wait(timeout=20)
    assert time.monotonic() - started < 10  # no grace period needed: the service stopped at once

    time.sleep(0.5)
    assert group_members(guard.pid) == []


def test_the_guard_exits_with_the_service_code() -> None:
    done = subprocess.run([sys.executable, "-c", GUARD_MAIN, sys.executable, "-c", "raise SystemExit(3)"])
    assert done.returncode == 3
    assert os.getpgid(0)  # the test process itself was not touched
