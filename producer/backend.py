"""The abstract ``Backend`` and the typed keyword arguments of a train call."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, TypedDict

from producer.types import ImportanceSamplingLevel, TrainConfig, TrainResult, TrajectoryGroup

if TYPE_CHECKING:
    from typing import Unpack

    from producer.jobs import TrainJob
    from producer.model import TrainableModel

__all__ = ["Backend", "TrainOptions"]


class TrainOptions(TypedDict, total=False):
    """The keyword arguments of ``train``/``submit_train``: the fields of ``TrainConfig``.

    A name outside this list is a ``TypeError`` at the call (TrainConfig refuses
    it before any I/O); a test keeps the two lists equal.
    """

    learning_rate: float
    beta: float
    ppo: bool
    epsilon: float | None
    epsilon_high: float | None
    scale_rewards: bool
    importance_sampling_level: ImportanceSamplingLevel
    max_staleness: int | None
    allow_training_without_logprobs: bool


def build_config(options: TrainOptions) -> TrainConfig:
    """``TrainConfig`` from keyword arguments: ``TypeError`` for an unknown name, ``ValueError`` for a bad value."""
    return TrainConfig(**options)


class Backend(abc.ABC):
    """Where trainable models are registered and trained."""

    @abc.abstractmethod
    async def register(self, model: TrainableModel) -> None:
        """Make ``model`` known to the trainer; idempotent. Afterwards ``name@0`` is servable."""

    @abc.abstractmethod
    async def submit_train(
        self, model: TrainableModel, groups: list[TrajectoryGroup], **options: Unpack[TrainOptions]
    ) -> TrainJob:
        """Queue one train step and return at once with its handle."""

    @abc.abstractmethod
    async def train(
        self,
        model: TrainableModel,
        groups: list[TrajectoryGroup],
        *,
        timeout: float | None = None,
        **options: Unpack[TrainOptions],
    ) -> TrainResult:
        """Run one train step and wait for it: the new step, its metrics and checkpoint."""

    @abc.abstractmethod
    async def get_step(self, model: TrainableModel) -> int:
        """The latest committed step of ``model``."""

    @abc.abstractmethod
    async def delete_checkpoints(self, model: TrainableModel, keep_steps: list[int]) -> list[int]:
        """Delete every checkpoint of ``model`` but ``keep_steps`` and the latest; return the deleted steps."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections (and, for a local backend, stop what it started)."""

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
