"""An inference worker (``python -m inference_worker``) as a test's child process, and its stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from producer.keys import CHECKPOINT_STREAM
from tests.support.services import child_env, free_port, python_module_cmd, wait_for_port

API_KEY = "test-key"


def publish_checkpoint(
    redis_url: str,
    *,
    kind: str,
    project: str,
    model: str,
    step: int,
    path: Path | str,
    base_model: str,
    created_at: float | None = None,
) -> str:
    """XADD one checkpoint event, as the trainer does (every field a string)."""
    fields = {
        "kind": kind,
        "project": project,
        "model": model,
        "step": str(step),
        "path": str(path),
        "job_id": f"job-{model}-{step}",
        "base_model": base_model,
        "created_at": repr(time.time() if created_at is None else created_at),
    }
    with redis.Redis.from_url(redis_url) as client:
        return client.xadd(CHECKPOINT_STREAM, fields).decode()


class InferenceWorker:
    """One ``python -m inference_worker`` on free loopback ports, logging to a file."""

    def __init__(
        self, *, redis_url: str, base_model: Path, checkpoint_root: Path, log_path: Path,
        settings: dict[str, str | None] | None = None,
    ) -> None:
        """``settings`` replace or add flags, e.g. ``{"--max-model-len": "4096", "--no-grouped-lora": None}``
        (``None``: a flag without a value); the defaults keep tests light."""
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = log_path
        flags: dict[str, str | None] = {
            "--redis-url": redis_url,
            "--base-model": str(base_model),
            "--checkpoint-root": str(checkpoint_root),
            "--port": str(self.port),
            "--metrics-port": str(self.metrics_port),
            "--api-key": API_KEY,
            "--kv-cache-gib": "1",
            "--max-model-len": "512",
            "--max-loras": "2",
            "--max-lora-rank": "8",
            "--restart-backoff-s": "0.2",
            "--health-interval-s": "0.5",
            **(settings or {}),
        }
        args = [part for flag, value in flags.items() for part in ((flag,) if value is None else (flag, value))]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                python_module_cmd("inference_worker", *args), env=child_env(), stdout=log, stderr=subprocess.STDOUT
            )
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Bearer {API_KEY}"})

    def wait_metrics_port(self) -> None:
        wait_for_port(self.metrics_port, timeout=30, proc=self.proc)

    async def model_ids(self) -> set[str]:
        """What ``/v1/models`` lists; empty while vLLM is not answering."""
        try:
            response = await self.http.get("/v1/models", timeout=5)
        except httpx.TransportError:
            return set()
        if response.status_code != 200:
            return set()
        return {card["id"] for card in response.json()["data"]}

    async def wait_models(self, present: set[str], absent: set[str] = frozenset(), timeout: float = 120.0) -> set[str]:
        """Poll ``/v1/models`` until every ``present`` name is listed and no ``absent`` one is."""
        deadline = time.monotonic() + timeout
        ids: set[str] = set()
        while time.monotonic() < deadline:
            self.check_alive()
            ids = await self.model_ids()
            if present <= ids and not (absent & ids):
                return ids
            await asyncio.sleep(0.05)
        raise TimeoutError(f"wanted {present} without {absent}, /v1/models has {ids}\n{self.log_tail()}")

    async def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until vLLM answers and is warmed up (``trainq_vllm_up`` is 1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.metrics().get(("trainq_vllm_up", ()), 0.0) == 1.0:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"vLLM not up after {timeout} s\n{self.log_tail()}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The worker's own /metrics as ``{(sample name, sorted labels): value}``."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def vllm_pid(self) -> int | None:
        """The pid of the vLLM api_server child, if one runs."""
        import psutil

        for child in psutil.Process(self.proc.pid).children():
            try:
                if "vllm.entrypoints.openai.api_server" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        return None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"inference worker exited with {self.proc.returncode}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        noise = ("Route:", "GET /health", "GET /v1/models", "GET /metrics")
        text = [line for line in self.log_path.read_text(errors="replace").splitlines()
                if not any(n in line for n in noise)]
        return "\n".join(text[-lines:])

    async def aclose(self) -> None:
        """SIGTERM the worker (it stops vLLM) and wait; SIGKILL its group if it hangs."""
        await self.http.aclose()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
