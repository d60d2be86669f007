"""The production deploy files say what docs/deploy.md promises.

Compose cannot run here (no Docker engine), so its structure is checked as
data: the services, Redis durability and auth, GPUs, the shared checkpoint
volume, and that every PromQL expression in the dashboard and alert rules
names a metric the services really export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

TRAINQ_SERVICES = ("trainer", "inference")
GPU_SERVICES = ("trainer", "inference", "inference-2")

# The metrics the workers export (DESIGN.md, "Metrics"), by Prometheus type.
COUNTERS = {
    "trainq_jobs_total",
    "trainq_trained_tokens_total",
    "trainq_checkpoint_events_total",
    "trainq_vllm_restarts_total",
}
GAUGES = {
    "trainq_queue_depth",
    "trainq_step",
    "trainq_loss",
    "trainq_reward",
    "trainq_last_step_timestamp_seconds",
    "trainq_adapters_loaded",
    "trainq_vllm_up",
}
HISTOGRAMS = {
    "trainq_queue_wait_seconds",
    "trainq_train_duration_seconds",
    "trainq_checkpoint_save_duration_seconds",
    "trainq_adapter_load_duration_seconds",
    "trainq_checkpoint_to_servable_seconds",
}
KNOWN_SERIES = (
    COUNTERS | GAUGES | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
# Series Prometheus makes itself for every target.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


# ---------------------------------------------------------------- PromQL names

_PROMQL_FUNCTIONS_AND_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, labels and variables left out).

    Not a PromQL parser: it removes what cannot be a metric name (strings,
    label matchers, grouping clauses, ranges, Grafana variables, numbers) and
    keeps the identifiers that are not called as functions.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"', " ", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery selectors
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, called = match.group(1), match.group(2)
        if not called and name.lower() not in _PROMQL_FUNCTIONS_AND_KEYWORDS:
            names.add(name)
    return names


def unknown_metrics(expr: str) -> set[str]:
    return {
        name
        for name in promql_metric_names(expr)
        if name not in KNOWN_SERIES and name not in SCRAPE_SERIES and not name.startswith("vllm:")
    }


def test_promql_metric_names_sees_through_functions_labels_and_grouping() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) '
        '(rate(trainq_queue_wait_seconds_bucket{model=~"$model", x="a b"}[$__rate_interval])))'
    )
    assert promql_metric_names(expr) == {"trainq_queue_wait_seconds_bucket"}
    assert promql_metric_names("time() - max(trainq_step) > 0 and on(model) vllm:num_requests_running") == {
        "trainq_step",
        "vllm:num_requests_running",
    }
    assert unknown_metrics("rate(trainq_jobs_count[5m]) + trainq_queue_wait_seconds") == {
        "trainq_jobs_count",
        "trainq_queue_wait_seconds",  # a histogram is read through _bucket/_sum/_count only
    }


# --------------------------------------------------------------------- compose


def test_compose_has_the_five_services(services: dict[str, Any]) -> None:
    assert {"redis", "trainer", "inference", "prometheus", "grafana"} <= set(services)


def test_redis_keeps_an_append_only_file_and_requires_a_password(services: dict[str, Any]) -> None:
    command = services["redis"]["command"]
    args = command if isinstance(command, list) else command.split()
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_redis_data_and_checkpoints_live_in_named_volumes(compose: dict[str, Any]) -> None:
    assert {"redis-data", "checkpoints"} <= set(compose["volumes"])


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_services_reserve_an_nvidia_gpu(services: dict[str, Any], name: str) -> None:
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_trainer_and_inference_replicas_each_get_their_own_gpu_by_default(services: dict[str, Any]) -> None:
    defaults = []
    for name in GPU_SERVICES:
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        (ids,) = device["device_ids"]
        defaults.append(re.fullmatch(r"\$\{\w+:-(\d+)\}", ids).group(1))
    assert len(set(defaults)) == len(defaults)


def _checkpoint_mount(service: dict[str, Any]) -> tuple[str, str]:
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if target == "/checkpoints":
            return source, target
    raise AssertionError(f"no /checkpoints mount in {service['volumes']}")


def test_trainer_and_inference_share_the_checkpoint_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    mounts = {name: _checkpoint_mount(services[name]) for name in GPU_SERVICES}
    assert len(set(mounts.values())) == 1
    source, _ = mounts["trainer"]
    assert source in compose["volumes"]
    for name in GPU_SERVICES:
        assert services[name]["environment"]["TRAINQ_CHECKPOINT_ROOT"] == "/checkpoints"


@pytest.mark.parametrize("name", (*TRAINQ_SERVICES, "inference-2"))
def test_trainq_services_reach_redis_with_the_password(services: dict[str, Any], name: str) -> None:
    env = services[name]["environment"]
    assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD(:-[^}]+)?\}@redis:6379/\d+", env["TRAINQ_REDIS_URL"])
    assert env["TRAINQ_BASE_MODEL"]
    assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_services_have_healthchecks_and_restart(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service["restart"] in ("unless-stopped", "always"), name
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_the_service_ports_are_the_documented_ones(services: dict[str, Any]) -> None:
    assert services["trainer"]["environment"]["TRAINQ_METRICS_PORT"] == "9101"
    assert services["trainer"]["environment"]["TRAINQ_DEVICE"] == "cuda"
    inference = services["inference"]["environment"]
    assert (inference["TRAINQ_PORT"], inference["TRAINQ_METRICS_PORT"]) == ("8000", "9102")
    assert inference["TRAINQ_API_KEY"].startswith("${TRAINQ_API_KEY")


def test_dockerfiles_and_mounted_files_exist(services: dict[str, Any]) -> None:
    for name in ("trainer", "inference"):
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


def test_env_example_lists_every_variable_the_compose_file_reads() -> None:
    used = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))
    documented = {
        line.split("=", 1)[0]
        for line in (DEPLOY / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used - documented == set()


# ------------------------------------------------------------------ Prometheus


@pytest.fixture(scope="module")
def scrape_configs() -> dict[str, dict[str, Any]]:
    config = load_yaml(DEPLOY / "prometheus.yml")
    return {job["job_name"]: job for job in config["scrape_configs"]}


def _target_ports(job: dict[str, Any]) -> set[int]:
    ports = {int(t.rsplit(":", 1)[1]) for sc in job.get("static_configs", []) for t in sc["targets"]}
    ports |= {int(sd["port"]) for sd in job.get("dns_sd_configs", [])}
    return ports


def test_prometheus_scrapes_trainer_inference_vllm_and_itself(scrape_configs: dict[str, dict[str, Any]]) -> None:
    assert _target_ports(scrape_configs["trainq-trainer"]) == {9101}
    assert _target_ports(scrape_configs["trainq-inference"]) == {9102}
    assert _target_ports(scrape_configs["vllm"]) == {8000}
    assert scrape_configs["vllm"].get("metrics_path", "/metrics") == "/metrics"
    assert "authorization" not in scrape_configs["vllm"]  # vLLM's /metrics is outside its API key
    assert _target_ports(scrape_configs["prometheus"]) == {9090}


def test_alert_rules_use_only_exported_metrics() -> None:
    for path in sorted((DEPLOY / "rules").glob("*.yml")):
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                assert unknown_metrics(rule["expr"]) == set(), (path.name, rule["alert"])


# --------------------------------------------------------------------- Grafana


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "trainq.json").read_text())


def _panel_exprs(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    return {
        panel["title"]: [target["expr"] for target in panel.get("targets", [])]
        for panel in dashboard["panels"]
        if panel["type"] != "row"
    }


def test_every_panel_queries_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    for title, exprs in _panel_exprs(dashboard).items():
        assert exprs, title
        for expr in exprs:
            assert promql_metric_names(expr), (title, expr)
            assert unknown_metrics(expr) == set(), (title, expr)
    for variable in dashboard["templating"]["list"]:
        metric, _label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
        assert unknown_metrics(metric) == set(), variable["name"]


def test_dashboard_covers_the_operational_questions(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(e for es in _panel_exprs(dashboard).values() for e in es)
    for needed in (
        "trainq_queue_depth",
        "trainq_jobs_total",
        "trainq_queue_wait_seconds_bucket",
        "trainq_train_duration_seconds_bucket",
        "trainq_step",
        "trainq_reward",
        "trainq_loss",
        "trainq_checkpoint_to_servable_seconds_bucket",
        "trainq_adapters_loaded",
        "trainq_vllm_up",
        "trainq_vllm_restarts_total",
    ):
        assert needed in exprs, needed
    for histogram in ("trainq_queue_wait_seconds", "trainq_train_duration_seconds",
                      "trainq_checkpoint_to_servable_seconds"):
        for quantile in ("0.5", "0.95"):
            assert f"histogram_quantile({quantile}, sum by (le" in exprs and histogram in exprs


def test_dashboard_panels_use_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    (datasource,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_provider_points_at_the_mounted_folder(services: dict[str, Any]) -> None:
    (provider,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "trainq.yml")["providers"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
