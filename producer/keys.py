"""Every Redis key, stream, channel and Celery name trainq uses, in one place."""

from __future__ import annotations

import re

PREFIX = "trainq"

CHECKPOINT_STREAM = f"{PREFIX}:checkpoints"
"""Stream of ``CheckpointEvent`` s; capped at ``CHECKPOINT_STREAM_MAXLEN`` entries."""
CHECKPOINT_STREAM_MAXLEN = 100_000

WORKERS_KEY = f"{PREFIX}:workers"
"""Hash: worker hostname -> msgpack of what it serves (for ``trainq status``)."""

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


def job_channel(job_id: str) -> str:
    """Pub/sub channel the worker publishes to when the job's status changes."""
    return f"{PREFIX}:job:{job_id}:events"


def model_key(project: str, name: str) -> str:
    """Hash of a registered model: base_model, step (latest committed), updated_at."""
    return f"{PREFIX}:model:{project}:{name}"


def queue_jobs_key(queue: str) -> str:
    """Sorted set of the job ids submitted to ``queue`` (score: submit time), for ``trainq jobs``."""
    return f"{PREFIX}:queue:{queue}:jobs"


def queue_name(base_model: str) -> str:
    """The Celery queue of one base model: ``trainq.train.<slug>``.

    Producers and the worker derive it from the same ``base_model`` string.
    """
    slug = re.sub(r"[^a-z0-9._-]+", "-", base_model.lower()).strip("-.") or "model"
    return f"{PREFIX}.train.{slug}"
