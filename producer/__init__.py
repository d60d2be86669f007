"""trainq's client SDK: what rollout code imports.

    model = TrainableModel("agent-001", "my-project", base_model="trainq/smollm2-135m-instruct")
    await model.register(backend)
    result = await backend.train(model, groups, learning_rate=1e-5)
    await model.log(groups, metrics=result.metrics, step=result.step, split="train")

Importing it never imports torch, transformers or vllm.
"""

from producer.backend import Backend, TrainOptions
from producer.errors import (
    BackendUnavailableError,
    JobCancelledError,
    JobError,
    JobFailedError,
    JobNotFoundError,
    NoWorkerError,
    PayloadTooLargeError,
    TrainqError,
    TrainTimeoutError,
)
from producer.gather import gather_trajectories, gather_trajectory_groups
from producer.jobs import JobRecord, TrainJob
from producer.local_backend import LocalBackend
from producer.model import Model, TrainableModel
from producer.queue_backend import QueueBackend
from producer.types import (
    Choice,
    ChoiceMessage,
    ExceptionInfo,
    JobStatus,
    LocalTrainResult,
    QueueTrainResult,
    TrainConfig,
    TrainResult,
    Trajectory,
    TrajectoryGroup,
)

__all__ = [
    # models
    "Model",
    "TrainableModel",
    # backends and jobs
    "Backend",
    "JobRecord",
    "LocalBackend",
    "JobStatus",
    "QueueBackend",
    "TrainJob",
    "TrainOptions",
    # data
    "Choice",
    "ChoiceMessage",
    "ExceptionInfo",
    "Trajectory",
    "TrajectoryGroup",
    "gather_trajectories",
    "gather_trajectory_groups",
    # config and results
    "LocalTrainResult",
    "QueueTrainResult",
    "TrainConfig",
    "TrainResult",
    # errors
    "BackendUnavailableError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobNotFoundError",
    "NoWorkerError",
    "PayloadTooLargeError",
    "TrainTimeoutError",
    "TrainqError",
]
