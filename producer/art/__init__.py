"""OpenPipe ART's package layout over trainq, so that ART code runs with only its imports changed.

    import producer.art as art                      # was: import art
    from producer.art.local import LocalBackend     # was: from art.local import LocalBackend
    from producer.art.types import LocalTrainResult # was: from art.types import LocalTrainResult

Every name here is one of trainq's own classes and functions (``art.Trajectory``
is ``producer.Trajectory``): there is one set of types, and trainq's core
types accept ART's forms. What ART has and trainq does not do raises an
error that names it; the README's "Coming from ART" lists what differs.
"""

from __future__ import annotations

from typing import Any

from producer.art import dev, types, utils
from producer.art.types import Messages, MessagesAndChoices, Tools, TrainConfig
from producer.art.utils import retry
from producer.backend import Backend
from producer.gather import gather_trajectories, gather_trajectory_groups
from producer.local_backend import LocalBackend
from producer.model import Model, TrainableModel
from producer.types import Trajectory, TrajectoryGroup

__all__ = [
    "Backend",
    "LocalBackend",
    "Messages",
    "MessagesAndChoices",
    "Model",
    "Tools",
    "TrainConfig",
    "TrainableModel",
    "Trajectory",
    "TrajectoryGroup",
    "dev",
    "gather_trajectories",
    "gather_trajectory_groups",
    "retry",
    "types",
    "utils",
]

_UNSUPPORTED = {
    "ServerlessBackend": "trainq trains on your own machines: use LocalBackend, or QueueBackend for a deployed stack",
    "SkyPilotBackend": "trainq runs its workers itself: use LocalBackend, or deploy the stack (docs/deploy.md)",
    "TinkerBackend": "use LocalBackend, or QueueBackend for a deployed stack",
    "trajectory_group_batches": "batch the groups yourself; backend.train takes any number of groups",
}


def __getattr__(name: str) -> Any:
    if name in _UNSUPPORTED:
        raise AttributeError(f"art.{name} is not supported by trainq: {_UNSUPPORTED[name]}")
    raise AttributeError(f"art.{name} is not part of trainq's ART layer (producer.art); see README, 'Coming from ART'")
