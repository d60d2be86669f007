"""The wire contract: every record that crosses a process boundary, by idea.

- ``rollouts``: ``Choice``, ``Trajectory``, ``TrajectoryGroup`` (what rollout code builds; a train job's payload)
- ``config``: ``TrainConfig`` (how a step is run; checked before anything is queued)
- ``results``: ``TrainResult`` and its local and queue forms (what a train call returns)
- ``messages``: ``ModelRef``, ``TrainRequest``, ``JobStatus``, ``JobOutcome``, ``CheckpointEvent``
  (what the services tell each other over Redis)

All three packages import it; it imports only msgspec and the standard library.
Import from here (``from producer.types import Trajectory``), not from the
modules. Records evolve by msgspec's schema-evolution rules: a new field gets a
default and goes last, no field is ever reordered or renamed, and a field's type
only ever widens, so that readers accept what older writers sent. Nothing here
is ever pickled.
"""

from __future__ import annotations

from producer.types.config import IMPORTANCE_SAMPLING_LEVELS, ImportanceSamplingLevel, TrainConfig
from producer.types.messages import (
    CheckpointEvent,
    CheckpointEventKind,
    JobKind,
    JobOutcome,
    JobStatus,
    ModelRef,
    TrainRequest,
)
from producer.types.results import LocalTrainResult, QueueTrainResult, TrainResult
from producer.types.rollouts import (
    SAMPLER_FIELD,
    Choice,
    ChoiceMessage,
    ExceptionInfo,
    MessageOrChoice,
    Trajectory,
    TrajectoryGroup,
    as_float_metrics,
    as_messages_and_choices,
    choice_as_message,
)

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "SAMPLER_FIELD",
    "CheckpointEvent",
    "CheckpointEventKind",
    "Choice",
    "ChoiceMessage",
    "ExceptionInfo",
    "ImportanceSamplingLevel",
    "JobKind",
    "JobOutcome",
    "JobStatus",
    "LocalTrainResult",
    "MessageOrChoice",
    "ModelRef",
    "QueueTrainResult",
    "TrainConfig",
    "TrainRequest",
    "TrainResult",
    "Trajectory",
    "TrajectoryGroup",
    "as_float_metrics",
    "as_messages_and_choices",
    "choice_as_message",
]
