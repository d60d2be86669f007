"""Helpers to run a real Prometheus on the project's scrape config against local endpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.services import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def prometheus_tool(name: str) -> str:
    """Path of Debian's ``prometheus`` or ``promtool``; skip without it, but fail on CI, which installs it."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian package: prometheus; scripts/test.sh installs it)"
        if on_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@dataclass
class MetricsTargets:
    """What Prometheus should scrape and what it must then hold.

    ``targets`` maps a ``job_name`` of deploy/prometheus.yml to the
    ``host:port`` endpoints that play that job; ``expected`` maps a job to the
    series names that must come back under that job label.
    """

    targets: dict[str, list[str]]
    expected: dict[str, list[str]] = field(default_factory=dict)


@contextmanager
def serve_registry(registry: Any) -> Iterator[str]:
    """Serve one prometheus_client registry on a free loopback port; yield ``host:port``."""
    from prometheus_client import start_http_server

    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def build_standin_registries() -> dict[str, Any]:
    """Registries that export a few series of each job under their real names and labels."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    trainer = CollectorRegistry()
    Gauge("trainq_step", "Latest step", ["model"], registry=trainer).labels("demo/agent").set(3)
    Gauge("trainq_queue_depth", "Queued jobs", ["queue"], registry=trainer).labels("trainq.train.tiny").set(2)
    jobs = Counter("trainq_jobs", "Finished jobs", ["model", "kind", "status"], registry=trainer)
    jobs.labels("demo/agent", "train", "succeeded").inc(3)
    jobs.labels("demo/agent", "train", "failed").inc()
    wait = Histogram("trainq_queue_wait_seconds", "Queue wait", ["model"], registry=trainer)
    for seconds in (0.01, 0.2, 1.5):
        wait.labels("demo/agent").observe(seconds)

    inference = CollectorRegistry()
    Gauge("trainq_adapters_loaded", "Adapters loaded", registry=inference).set(4)
    Gauge("trainq_vllm_up", "vLLM answers", registry=inference).set(1)

    vllm = CollectorRegistry()
    Gauge("vllm:num_requests_running", "Requests running", ["model_name"], registry=vllm).labels("base").set(0)
    return {"trainq-trainer": trainer, "trainq-inference": inference, "vllm": vllm}


def rewrite_scrape_config(
    source: Path, targets: dict[str, list[str]], self_address: str, interval: str = "1s"
) -> dict[str, Any]:
    """The project's config with every job pointed at local endpoints and a short interval.

    Jobs keep their names, metrics paths and relabelling; only how targets are
    found changes (DNS names of the compose network become static loopback
    addresses). Jobs without a local endpoint are left out. Rule files become
    absolute so the config can live in a temporary folder.
    """
    config = yaml.safe_load(source.read_text())
    unknown = set(targets) - {job["job_name"] for job in config["scrape_configs"]}
    if unknown:
        raise ValueError(f"no such job in {source.name}: {sorted(unknown)}")
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    config["rule_files"] = [str(source.parent / pattern) for pattern in config.get("rule_files", [])]
    jobs = []
    for job in config["scrape_configs"]:
        addresses = [self_address] if job["job_name"] == "prometheus" else targets.get(job["job_name"])
        if not addresses:
            continue
        local = {
            key: value
            for key, value in job.items()
            if not key.endswith("_sd_configs") and key not in ("static_configs", "scrape_interval", "scrape_timeout")
        }
        local["static_configs"] = [{"targets": addresses}]
        jobs.append(local)
    config["scrape_configs"] = jobs
    return config


class PrometheusAPI:
    """The few calls of Prometheus's HTTP API the tests need."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        return self.get("/api/v1/query", query=expr)["result"]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty vector."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} still empty after {timeout} s")
            time.sleep(0.25)


@contextmanager
def run_prometheus(workdir: Path, metrics: MetricsTargets) -> Iterator[PrometheusAPI]:
    """Run Debian's ``prometheus`` on the project's config, rewritten to scrape ``metrics``; stop it after."""
    binary = prometheus_tool("prometheus")
    port = free_port()
    config = rewrite_scrape_config(PROMETHEUS_CONFIG, metrics.targets, f"127.0.0.1:{port}")
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, timeout=30, proc=proc)
        api = PrometheusAPI(f"http://127.0.0.1:{port}")
        _wait_ready(api, log_path)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(api: PrometheusAPI, log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:  # the port opens before the TSDB is ready
        try:
            with urllib.request.urlopen(f"{api.base_url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"prometheus not ready; log:\n{log_path.read_text()}")
        time.sleep(0.1)
