"""The abstract ``Backend`` and the typed keyword arguments of a train call."""

from __future__ import annotations

import abc
import sys
import weakref
from typing import TYPE_CHECKING, Any, TypedDict

from producer.types import ImportanceSamplingLevel, TrainConfig, TrainResult, TrajectoryGroup

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Unpack

    from producer.jobs import TrainJob
    from producer.model import Model, TrainableModel

__all__ = ["ART_NO_OP_KEYWORDS", "Backend", "TrainOptions", "build_config"]


class TrainOptions(TypedDict, total=False):
    """The keyword arguments of ``train``/``submit_train``.

    The fields of ``TrainConfig`` (see its docstring for each), then the
    keywords of ART's ``LocalBackend.train`` that change nothing in trainq
    (``ART_NO_OP_KEYWORDS``). A name outside this list is a ``TypeError`` at
    the call, before any I/O; a test keeps the lists equal.
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
    advantage_balance: float
    max_negative_advantage_importance_sampling_weight: float | None
    mask_prob_ratio: bool
    truncated_importance_sampling: float | None
    scale_learning_rate_by_reward_std_dev: bool
    num_trajectories_learning_rate_multiplier_power: float
    kimi_k2_tau: float | None
    # ART's keywords that change nothing here (see ART_NO_OP_KEYWORDS).
    verbose: bool
    plot_tensors: bool
    logprob_calculation_chunk_size: int
    precalculate_logprobs: bool
    save_checkpoint: bool
    kl_penalty_coef: float


ART_NO_OP_KEYWORDS: dict[str, str] = {
    "verbose": "True prints the job's progress to stderr",
    "plot_tensors": "trainq draws no tensor plots",
    "logprob_calculation_chunk_size": "the trainer computes logprobs in its own chunks",
    "precalculate_logprobs": "the trainer's logprobs come from the step's own forward pass, before its update",
    "save_checkpoint": "every step is saved: a step is its checkpoint (only True is accepted)",
    "kl_penalty_coef": "only 0 is accepted; beta= weighs a k3 KL penalty to the base model",
}
"""ART's ``LocalBackend.train`` keywords that ``backend.train`` accepts and what they mean here."""


def build_config(options: dict[str, Any]) -> tuple[TrainConfig, bool]:
    """``TrainConfig`` and ``verbose`` from keyword arguments, checked before any I/O.

    ``TypeError`` for an unknown name, ``ValueError`` for a bad value (naming it),
    including an ART keyword set to something trainq does not do.
    """
    options = dict(options)
    art = {name: options.pop(name) for name in list(options) if name in ART_NO_OP_KEYWORDS}
    for name in ("verbose", "plot_tensors", "precalculate_logprobs", "save_checkpoint"):
        if name in art and not isinstance(art[name], bool):
            raise ValueError(f"{name} must be True or False, got {art[name]!r}")
    if art.get("save_checkpoint") is False:
        raise ValueError("save_checkpoint=False is not supported: every trainq step is saved as its checkpoint")
    chunk = art.get("logprob_calculation_chunk_size", 1)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"logprob_calculation_chunk_size must be an int >= 1, got {chunk!r}")
    if art.get("kl_penalty_coef", 0) not in (0, 0.0):
        raise ValueError(
            f"kl_penalty_coef={art['kl_penalty_coef']!r} is not supported by trainq; "
            "beta= weighs a k3 KL penalty to the base model"
        )
    if art.get("plot_tensors"):
        print("trainq: plot_tensors=True has no effect: trainq draws no tensor plots", file=sys.stderr)
    return TrainConfig(**options), bool(art.get("verbose", False))


class Backend(abc.ABC):
    """Where trainable models are registered and trained."""

    @abc.abstractmethod
    async def register(self, model: TrainableModel) -> None:
        """Make ``model`` known to the trainer; idempotent. Afterwards ``name@0`` is servable."""

    @abc.abstractmethod
    async def submit_train(
        self, model: TrainableModel, groups: Iterable[TrajectoryGroup], **options: Unpack[TrainOptions]
    ) -> TrainJob:
        """Queue one train step and return at once with its handle."""

    @abc.abstractmethod
    async def train(
        self,
        model: TrainableModel,
        groups: Iterable[TrajectoryGroup],
        *,
        timeout: float | None = None,
        **options: Unpack[TrainOptions],
    ) -> TrainResult:
        """Run one train step and wait for it: the new step, its metrics and checkpoint."""

    @abc.abstractmethod
    async def collect(self, model: TrainableModel, job: TrainJob, *, timeout: float | None = None) -> TrainResult:
        """Wait for ``model``'s train ``job`` (from ``submit_train``); afterwards its step is the model's latest."""

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

    def _track(self, model: Model) -> None:
        """Remember ``model``, registered here, so that ``close`` closes its clients."""
        self.__dict__.setdefault("_models", weakref.WeakSet()).add(model)

    async def _close_models(self) -> None:
        for model in list(self.__dict__.get("_models", ())):
            await model.close()
