"""deploy/prometheus.yml is valid and, run by a real Prometheus, collects trainq's series."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.deploy.prometheus_server import (
    PROMETHEUS_CONFIG,
    ROOT,
    MetricsTargets,
    PrometheusAPI,
    prometheus_tool,
    rewrite_scrape_config,
)


def test_promtool_accepts_the_config_and_its_rules() -> None:
    promtool = prometheus_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # check config also checks the rule files it references; make sure there were some
    assert "rules found" in result.stdout + result.stderr


def test_rewritten_config_is_valid_too(tmp_path: Path) -> None:
    import yaml

    promtool = prometheus_tool("promtool")
    config = rewrite_scrape_config(
        PROMETHEUS_CONFIG, {"trainq-trainer": ["127.0.0.1:1"], "vllm": ["127.0.0.1:2"]}, "127.0.0.1:3"
    )
    assert [job["job_name"] for job in config["scrape_configs"]] == ["prometheus", "trainq-trainer", "vllm"]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_prometheus_scrapes_every_job_and_answers_queries(
    start_prometheus: Callable[[MetricsTargets], PrometheusAPI], metrics_targets: MetricsTargets
) -> None:
    prometheus = start_prometheus(metrics_targets)

    for job in [*metrics_targets.targets, "prometheus"]:
        (up,) = prometheus.wait_for(f'up{{job="{job}"}} == 1')
        assert up["metric"]["job"] == job
    for job, names in metrics_targets.expected.items():
        for name in names:
            series = prometheus.wait_for(f'{{__name__="{name}", job="{job}"}}')
            assert all(s["metric"]["job"] == job for s in series)

    # Model labels are project/name, never job ids, and arrive as exported.
    models = {s["metric"].get("model") for s in prometheus.query('{__name__=~"trainq_.+", model!=""}')}
    assert models and all(m and m.count("/") == 1 for m in models)

    # The alert rules were loaded from deploy/rules/.
    groups = prometheus.get("/api/v1/rules")["groups"]
    assert "trainq" in {group["name"] for group in groups}
    assert all(rule["health"] != "err" for group in groups for rule in group["rules"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_prometheus_parses_every_dashboard_query(
    start_prometheus: Callable[[MetricsTargets], PrometheusAPI], metrics_targets: MetricsTargets
) -> None:
    prometheus = start_prometheus(metrics_targets)
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "trainq.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            # Grafana fills these in before sending the query.
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
            prometheus.query(expr)  # a parse error is an HTTP 400, raised here
