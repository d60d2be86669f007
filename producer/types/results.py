"""What a train call returns: the new step and its metrics, and where the step came from."""

from __future__ import annotations

import msgspec

__all__ = ["LocalTrainResult", "QueueTrainResult", "TrainResult"]

class TrainResult(msgspec.Struct, kw_only=True):
    """What a train call returns: the new step and the step's metrics."""

    step: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class LocalTrainResult(TrainResult, kw_only=True):
    """A train result with the new step's checkpoint folder (ART's ``art.types.LocalTrainResult``)."""

    checkpoint_path: str | None = None


class QueueTrainResult(LocalTrainResult, kw_only=True):
    """A train result of a job that went through the queue: also its id and where its time went."""

    job_id: str
    queued_s: float = 0.0
    """Seconds between submission and the worker starting the job."""
    train_s: float = 0.0
    """Seconds the worker spent on the job."""
