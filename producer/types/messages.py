"""What the services tell each other over Redis: the job message, the job's status and outcome, checkpoint events."""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

from producer.names import inference_name, validate_name
from producer.types.config import TrainConfig

__all__ = [
    "CheckpointEvent",
    "CheckpointEventKind",
    "JobKind",
    "JobOutcome",
    "JobStatus",
    "ModelRef",
    "TrainRequest",
]

class ModelRef(msgspec.Struct, kw_only=True, frozen=True):
    """Which trainable model a job is for. Names are checked by ``validate``."""

    project: str
    name: str
    base_model: str

    def validate(self) -> ModelRef:
        validate_name(self.project, "project")
        validate_name(self.name, "model name")
        if not self.base_model:
            raise ValueError("base_model must not be empty")
        return self

    @property
    def key(self) -> str:
        """``project/name``: the model's identity in metrics labels and logs."""
        return f"{self.project}/{self.name}"


JobKind = Literal["train", "register", "delete_checkpoints"]


class TrainRequest(msgspec.Struct, kw_only=True, frozen=True):
    """The Celery message of a job; small. The groups travel separately (claim check).

    ``payload_key`` names the Redis key holding the msgpack of
    ``list[TrajectoryGroup]`` (train jobs only); ``keep_steps`` is for
    ``delete_checkpoints`` jobs.
    """

    job_id: str
    kind: JobKind
    model: ModelRef
    config: TrainConfig = TrainConfig()
    payload_key: str | None = None
    payload_bytes: int = 0
    submitted_at: float = 0.0
    keep_steps: list[int] = msgspec.field(default_factory=list)


class JobStatus(str, enum.Enum):
    """Where a job is in its life. Terminal states never change again."""

    QUEUED = "queued"  # in the broker, not yet taken by a worker; may be cancelled
    RUNNING = "running"  # a worker has started it (it is redelivered if the worker dies)
    SUCCEEDED = "succeeded"  # terminal: result recorded, its step exists on disk
    FAILED = "failed"  # terminal: error recorded; the job made no step
    CANCELLED = "cancelled"  # terminal: cancelled while queued; never ran

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobOutcome(msgspec.Struct, kw_only=True):
    """What the worker records when a job ends well."""

    step: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    checkpoint_path: str | None = None
    train_s: float = 0.0
    deleted_steps: list[int] = msgspec.field(default_factory=list)
    """Steps a ``delete_checkpoints`` job removed."""


CheckpointEventKind = Literal["saved", "deleted"]


class CheckpointEvent(msgspec.Struct, kw_only=True, frozen=True):
    """One entry of the ``trainq:checkpoints`` stream (fields are stored as strings)."""

    kind: CheckpointEventKind
    project: str
    model: str
    step: int
    path: str
    job_id: str = ""
    base_model: str = ""
    created_at: float = 0.0

    @property
    def inference_name(self) -> str:
        return inference_name(self.model, self.step)
