"""A real Prometheus, on the project's scrape config, reads trainq's series from the running stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer import QueueBackend, TrainableModel
from tests.integration.deploy.prometheus_server import MetricsTargets, run_prometheus
from tests.integration.inference.worker import InferenceWorker
from tests.support.groups import make_groups
from tests.support.services import WorkerProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(300)]


async def test_prometheus_scrapes_trainer_inference_and_vllm(
    backend: QueueBackend, trainer: WorkerProcess, inference: InferenceWorker, tiny_model: Path, tmp_path: Path
) -> None:
    model = TrainableModel("watched", "e2e", base_model=str(tiny_model))
    await model.register(backend)
    result = await backend.train(model, make_groups(2), timeout=120)
    await inference.wait_models({f"watched@{result.step}"}, timeout=180)

    targets = MetricsTargets(
        targets={
            "trainq-trainer": [f"127.0.0.1:{trainer.metrics_port}"],
            "trainq-inference": [f"127.0.0.1:{inference.metrics_port}"],
            "vllm": [f"127.0.0.1:{inference.port}"],
        }
    )
    with run_prometheus(tmp_path, targets) as prometheus:
        for job in targets.targets:
            prometheus.wait_for(f'up{{job="{job}"}} == 1', timeout=60)
        (step,) = prometheus.wait_for('trainq_step{job="trainq-trainer", model="e2e/watched"}', timeout=60)
        assert float(step["value"][1]) == result.step
        jobs = prometheus.wait_for(
            'trainq_jobs_total{job="trainq-trainer", model="e2e/watched", kind="train", status="succeeded"}'
        )
        assert float(jobs[0]["value"][1]) == 1
        prometheus.wait_for('trainq_queue_depth{job="trainq-trainer"}')
        servable = prometheus.wait_for(
            'trainq_checkpoint_to_servable_seconds_count{job="trainq-inference", model="e2e/watched"}'
        )
        assert float(servable[0]["value"][1]) >= 1
        (loaded,) = prometheus.wait_for('trainq_adapters_loaded{job="trainq-inference"}')
        assert float(loaded["value"][1]) >= 2  # watched@0 and watched@1
        prometheus.wait_for('{__name__=~"vllm:.+", job="vllm"}')
