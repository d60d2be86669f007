"""The trainer's Prometheus metrics.

They are updated in the prefork child that runs the jobs, so that child also
serves them (``serve``); the parent process serves nothing. Queue depth and the
worker's role (leader or standby) are read from Redis at scrape time, so they are
right even while a job is running.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from producer import keys

__all__ = [
    "CHECKPOINT_SAVE",
    "COLLECTIVE_SECONDS",
    "GROUP_NODES",
    "GROUP_RANKS",
    "GROUP_RESTARTS",
    "JOBS",
    "LAST_STEP_TIME",
    "LOSS",
    "MISMATCH_GAUGES",
    "QUEUE_WAIT",
    "RANK_TOKENS_PER_S",
    "REGISTRY",
    "RENDERED_TRAJECTORIES",
    "REWARD",
    "STEP",
    "STEP_GAUGES",
    "TRAINED_TOKENS",
    "TRAIN_DURATION",
    "LeaderCollector",
    "QueueDepthCollector",
    "serve",
]

# Train steps take seconds to hours; queue waits milliseconds to hours.
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

REGISTRY = CollectorRegistry()

JOBS = Counter(
    "trainq_jobs", "Jobs ended by this worker, by model, kind and final status.",
    ["model", "kind", "status"], registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "trainq_queue_wait_seconds", "Seconds from submission to the worker starting the job.",
    ["model"], buckets=_DURATION_BUCKETS, registry=REGISTRY,
)
TRAIN_DURATION = Histogram(
    "trainq_train_duration_seconds", "Seconds the worker spent running a train job.",
    ["model"], buckets=_DURATION_BUCKETS, registry=REGISTRY,
)
CHECKPOINT_SAVE = Histogram(
    "trainq_checkpoint_save_duration_seconds", "Seconds to write one checkpoint.",
    ["model"], buckets=_DURATION_BUCKETS, registry=REGISTRY,
)
TRAINED_TOKENS = Counter(
    "trainq_trained_tokens", "Tokens that carried loss.", ["model"], registry=REGISTRY,
)
STEP = Gauge("trainq_step", "Latest committed step.", ["model"], registry=REGISTRY)
LOSS = Gauge("trainq_loss", "Loss of the latest step.", ["model"], registry=REGISTRY)
REWARD = Gauge("trainq_reward", "Mean reward of the latest step's groups.", ["model"], registry=REGISTRY)
LAST_STEP_TIME = Gauge(
    "trainq_last_step_timestamp_seconds", "Unix time of the latest committed step.", ["model"], registry=REGISTRY,
)
RENDERED_TRAJECTORIES = Counter(
    "trainq_rendered_trajectories", "Trajectories trained without the sampler's prompt token ids "
    "(their context re-rendered by the chat template).", ["model"], registry=REGISTRY,
)

# The training-inference mismatch of the latest step, measured before its update (core/loss.mismatch_metrics).
MISMATCH_GAUGES = {
    "mismatch_kl_k3": "trainq_mismatch_kl_k3",
    "mismatch_logprob_abs_diff": "trainq_mismatch_logprob_abs_diff",
    "mismatch_ratio_mean": "trainq_mismatch_ratio_mean",
    "mismatch_ratio_max": "trainq_mismatch_ratio_max",
    "mismatch_context_fraction": "trainq_mismatch_context_ratio",
}
_MISMATCH_HELP = {
    "mismatch_kl_k3": "k3 estimate of KL(sampler || trainer) over the latest step's sampled tokens.",
    "mismatch_logprob_abs_diff": "Mean |trainer logprob - sampler logprob| of the latest step's sampled tokens.",
    "mismatch_ratio_mean": "Mean pi_trainer / pi_sampler of the latest step's sampled tokens.",
    "mismatch_ratio_max": "Largest pi_trainer / pi_sampler among the latest step's sampled tokens.",
    "mismatch_context_fraction": "Share of the latest step's trained tokens whose context is not the sampler's prompt.",
}

STEP_GAUGES: dict[str, Gauge] = {
    "loss": LOSS,
    "reward": REWARD,
    **{name: Gauge(metric, _MISMATCH_HELP[name], ["model"], registry=REGISTRY) for name, metric in MISMATCH_GAUGES.items()},
}
"""Gauges set from the train step's metric of the same name."""

GROUP_RANKS = Gauge(
    "trainq_group_ranks", "Ranks training the model (1: in the worker's own process).", registry=REGISTRY,
)
GROUP_NODES = Gauge("trainq_group_nodes", "Machines of the training group.", registry=REGISTRY)
GROUP_RESTARTS = Counter(
    "trainq_group_restarts", "Times the training group was started again after it failed.", registry=REGISTRY,
)
RANK_TOKENS_PER_S = Gauge(
    "trainq_rank_tokens_per_second", "Tokens a rank forwarded per second of the latest job with collectives.",
    ["rank"], registry=REGISTRY,
)
COLLECTIVE_SECONDS = Counter(
    "trainq_collective_seconds",
    "Seconds a rank spent in collectives (FSDP's all-gathers and reduce-scatters, state dicts, sums).",
    ["rank"], registry=REGISTRY,
)


class QueueDepthCollector(Collector):
    """``trainq_queue_depth{queue}``: messages waiting in the broker, read at scrape time."""

    def __init__(self, redis_client: object, queues: list[str]) -> None:
        self._redis = redis_client
        self._queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("trainq_queue_depth", "Jobs waiting in the broker queue.", labels=["queue"])
        for queue in self._queues:
            try:
                depth = self._redis.llen(queue)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a scrape must not fail because Redis blinked
                continue
            family.add_metric([queue], float(depth))
        yield family


class LeaderCollector(Collector):
    """``trainq_leader{queue}``: 1 while this worker leads its queue (consumes it, writes its steps), 0 on standby."""

    def __init__(self, redis_client: object, queue: str, worker_id: str) -> None:
        self._redis = redis_client
        self._queue = queue
        self._worker_id = worker_id

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "trainq_leader", "1 while this worker leads its queue and writes its steps, 0 while it stands by.",
            labels=["queue"],
        )
        try:
            holder = self._redis.get(keys.queue_leader_key(self._queue))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis blinked
            return
        leads = holder is not None and holder.decode().split(" ", 1)[-1] == self._worker_id
        family.add_metric([self._queue], 1.0 if leads else 0.0)
        yield family


def serve(port: int, redis_client: object, queue: str, worker_id: str) -> None:
    """Start the /metrics endpoint in this process (a daemon thread)."""
    REGISTRY.register(QueueDepthCollector(redis_client, [queue]))
    REGISTRY.register(LeaderCollector(redis_client, queue, worker_id))
    start_http_server(port, addr="0.0.0.0", registry=REGISTRY)
