"""Every Redis key, stream, channel and Celery name trainq uses, in one place."""

from __future__ import annotations

import re

__all__ = [
    "CHECKPOINT_STREAM",
    "CHECKPOINT_STREAM_MAXLEN",
    "IDLE_QUEUE",
    "JOB_TTL_S",
    "PREFIX",
    "TASK_TRAIN",
    "WORKERS_KEY",
    "WORKER_HEARTBEATS_KEY",
    "job_channel",
    "job_key",
    "job_lease_key",
    "model_key",
    "model_steps_key",
    "payload_key",
    "queue_jobs_key",
    "queue_leader_key",
    "queue_name",
    "queue_running_key",
    "queue_token_key",
]

PREFIX = "trainq"

CHECKPOINT_STREAM = f"{PREFIX}:checkpoints"
"""Stream of ``CheckpointEvent`` s; capped at ``CHECKPOINT_STREAM_MAXLEN`` entries."""
CHECKPOINT_STREAM_MAXLEN = 100_000

WORKERS_KEY = f"{PREFIX}:workers"
"""Hash: worker hostname -> msgpack ``producer.workers.WorkerInfo`` (what it serves)."""

WORKER_HEARTBEATS_KEY = f"{PREFIX}:workers:heartbeat"
"""Hash: worker hostname -> unix time of its main process's last heartbeat (live = recent)."""

TASK_TRAIN = "trainq.train"
"""The one Celery task: runs a ``TrainRequest`` of any kind (train, register, delete)."""

JOB_TTL_S = 7 * 24 * 3600
"""How long a finished job's record stays readable by ``backend.job(job_id)``."""


def job_key(job_id: str) -> str:
    """Hash with the job's lifecycle: status, model, timestamps, step, result, error."""
    return f"{PREFIX}:job:{job_id}"


def payload_key(job_id: str) -> str:
    """The claim check: msgpack of ``list[TrajectoryGroup]`` for one train job."""
    return f"{PREFIX}:job:{job_id}:payload"


def job_lease_key(job_id: str) -> str:
    """String with a TTL: the worker id of the live worker holding the job; gone = its worker is gone."""
    return f"{PREFIX}:job:{job_id}:lease"


def job_channel(job_id: str) -> str:
    """Pub/sub channel the worker publishes to when the job's status changes."""
    return f"{PREFIX}:job:{job_id}:events"


def model_key(project: str, name: str) -> str:
    """Hash of a registered model: base_model, step (latest committed), updated_at."""
    return f"{PREFIX}:model:{project}:{name}"


def model_steps_key(project: str, name: str) -> str:
    """Hash: job id -> the step it made, for every train job of the model; outlives checkpoint deletion."""
    return f"{PREFIX}:steps:{project}:{name}"


def queue_jobs_key(queue: str) -> str:
    """Sorted set of the job ids submitted to ``queue`` (score: submit time), for ``trainq jobs``."""
    return f"{PREFIX}:queue:{queue}:jobs"


def queue_running_key(queue: str) -> str:
    """Set of the job ids taken from ``queue`` and not ended: what the stalled-job check looks at."""
    return f"{PREFIX}:queue:{queue}:running"


def queue_leader_key(queue: str) -> str:
    """String with a TTL: ``"{token} {worker id}"`` of the one worker that consumes ``queue`` and writes its steps."""
    return f"{PREFIX}:queue:{queue}:leader"


def queue_token_key(queue: str) -> str:
    """Counter: the fencing token, raised each time another worker becomes the queue's leader."""
    return f"{PREFIX}:queue:{queue}:token"


IDLE_QUEUE = f"{PREFIX}.idle"
"""The queue a standby worker consumes while another worker leads its own: nothing is ever sent to it."""


def queue_name(base_model: str) -> str:
    """The Celery queue of one base model: ``trainq.train.<slug>``.

    Producers and the worker derive it from the same ``base_model`` string.
    """
    slug = re.sub(r"[^a-z0-9._-]+", "-", base_model.lower()).strip("-.") or "model"
    return f"{PREFIX}.train.{slug}"
