"""A real Prometheus server running the project's scrape config, and metrics endpoints for it to scrape.

``metrics_targets`` is the seam: today it serves stand-in endpoints from this
process; a fixture that starts the real trainer and inference workers (and
vLLM) can override it with the same shape and every test here keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.deploy.prometheus_server import (
    MetricsTargets,
    PrometheusAPI,
    build_standin_registries,
    run_prometheus,
    serve_registry,
)


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
    with ExitStack() as stack:
        yield lambda metrics: stack.enter_context(run_prometheus(tmp_path, metrics))
