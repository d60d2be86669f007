"""Real services for tests: a Redis server and worker processes, each on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from producer._stack_env import free_port, redis_server_binary

__all__ = ["free_port", "redis_server_binary", "run_redis", "start_trainer_worker", "wait_for_port"]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@contextmanager
def run_redis(data_dir: Path, *, port: int | None = None, extra: list[str] | None = None) -> Iterator[str]:
    """Start a private ``redis-server``; yield its URL; stop it after."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "no",
        *(extra or []),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def python_module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a worker process: this one, minus TRAINQ_* leaking from the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINQ_")}
    env.update(overrides)
    return env


class WorkerProcess:
    """A ``python -m trainer_worker`` process of a test, with what the test needs to poke at it."""

    def __init__(self, proc: subprocess.Popen, *, hostname: str, redis_url: str, base_model: str,
                 checkpoint_root: Path, metrics_port: int, log_path: Path) -> None:
        self.proc = proc
        self.hostname = hostname
        self.redis_url = redis_url
        self.base_model = base_model
        self.checkpoint_root = checkpoint_root
        self.metrics_port = metrics_port
        self.log_path = log_path

    def info(self) -> dict:
        import msgspec
        import redis

        from producer import keys

        raw = redis.Redis.from_url(self.redis_url).hget(keys.WORKERS_KEY, self.hostname)
        return msgspec.msgpack.decode(raw) if raw else {}

    def wait_ready(self, *, previous_child: int = 0, timeout: float = 120.0) -> int:
        """Wait until a training child (other than ``previous_child``) has loaded the model; return its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trainer worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            info = self.info()
            if info.get("ready_at") and info.get("child_pid") not in (0, previous_child):
                return int(info["child_pid"])
            time.sleep(0.1)
        raise TimeoutError(f"trainer worker not ready after {timeout} s:\n{self.log_tail()}")

    @property
    def child_pid(self) -> int:
        return int(self.info().get("child_pid", 0))

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_trainer_worker(redis_url: str, base_model: str, workdir: Path, *, hostname: str | None = None,
                         extra: list[str] | None = None, checkpoint_root: Path | None = None,
                         ready_timeout: float = 120.0) -> WorkerProcess:
    """Start a real trainer worker (separate process, prefork child) and wait until it can train."""
    workdir.mkdir(parents=True, exist_ok=True)
    hostname = hostname or f"trainer-{free_port()}@test"
    checkpoint_root = checkpoint_root or workdir / "checkpoints"
    metrics_port = free_port()
    log_path = workdir / f"{hostname.split('@')[0]}.log"
    args = python_module_cmd(
        "trainer_worker",
        "--redis-url", redis_url,
        "--base-model", base_model,
        "--checkpoint-root", str(checkpoint_root),
        "--metrics-port", str(metrics_port),
        "--hostname", hostname,
        *(extra or []),
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=child_env())
    worker = WorkerProcess(proc, hostname=hostname, redis_url=redis_url, base_model=base_model,
                           checkpoint_root=checkpoint_root, metrics_port=metrics_port, log_path=log_path)
    try:
        worker.wait_ready(timeout=ready_timeout)
    except BaseException:
        worker.stop()
        raise
    return worker
