"""The inference worker's Prometheus metrics (prefix ``trainq_``), served on ``--metrics-port``.

vLLM's own metrics stay on vLLM's port (``/metrics``); these are about the
worker's job: which checkpoints are servable, how fast, and vLLM's health.
Labels are bounded: ``model`` is ``project/name``, never a job id or a step.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["InferenceMetrics"]

# From a warm load on a tiny model (~50 ms) to a restart of vLLM with a big one (minutes).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class InferenceMetrics:
    """Every metric of one worker, in a registry of its own (so tests can build several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.adapters_loaded = Gauge(
            "trainq_adapters_loaded", "LoRA adapters (name@step) currently loaded in vLLM.", registry=r
        )
        self.adapter_load_duration = Histogram(
            "trainq_adapter_load_duration_seconds",
            "Duration of one /v1/load_lora_adapter call.",
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.checkpoint_to_servable = Histogram(
            "trainq_checkpoint_to_servable_seconds",
            "From a checkpoint event's created_at to the adapter answering its first 1-token request.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.checkpoint_events = Counter(
            "trainq_checkpoint_events_total",
            "Checkpoint stream entries read, by kind (saved, deleted, invalid).",
            ["kind"],
            registry=r,
        )
        self.vllm_restarts = Counter(
            "trainq_vllm_restarts_total", "Times vLLM was restarted after it died or stopped answering.", registry=r
        )
        self.vllm_up = Gauge("trainq_vllm_up", "1 while vLLM answers /health, else 0.", registry=r)
        for kind in ("saved", "deleted", "invalid"):
            self.checkpoint_events.labels(kind)  # export zeros, so rate() works from the first scrape

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
