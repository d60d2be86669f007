"""A real Prometheus server running the project's scrape config, and metrics endpoints for it to scrape.

``metrics_targets`` is the seam: today it serves stand-in endpoints from this
process; a fixture that starts the real trainer and inference workers (and
vLLM) can override it with the same shape and every test here keeps working.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from tests.integration.deploy.prometheus_server import (
    PROMETHEUS_CONFIG,
    MetricsTargets,
    PrometheusAPI,
    build_standin_registries,
    prometheus_tool,
    rewrite_scrape_config,
    serve_registry,
)
from tests.support.services import free_port, wait_for_port


@pytest.fixture
def metrics_targets() -> Iterator[MetricsTargets]:
    """Stand-in metrics endpoints for each job, served from this process."""
    with ExitStack() as stack:
        targets = {
            job: [stack.enter_context(serve_registry(registry))]
            for job, registry in build_standin_registries().items()
        }
        yield MetricsTargets(
            targets=targets,
            expected={
                "trainq-trainer": ["trainq_step", "trainq_jobs_total", "trainq_queue_wait_seconds_bucket"],
                "trainq-inference": ["trainq_adapters_loaded", "trainq_vllm_up"],
                "vllm": ["vllm:num_requests_running"],
            },
        )


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[MetricsTargets], PrometheusAPI]]:
    """Factory: run Debian's ``prometheus`` on the rewritten project config; stopped after the test."""
    binary = prometheus_tool("prometheus")
    procs: list[subprocess.Popen[bytes]] = []

    def start(metrics: MetricsTargets) -> PrometheusAPI:
        port = free_port()
        config = rewrite_scrape_config(PROMETHEUS_CONFIG, metrics.targets, f"127.0.0.1:{port}")
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        wait_for_port(port, timeout=30, proc=proc)
        api = PrometheusAPI(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:  # the port opens before the TSDB is ready
            try:
                with urllib.request.urlopen(f"{api.base_url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return api
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready; log:\n{(tmp_path / 'prometheus.log').read_text()}")
            time.sleep(0.1)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
