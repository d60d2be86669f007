"""``Model`` (something to sample from) and ``TrainableModel`` (a LoRA trained by trainq)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from producer.types import Trajectory, TrajectoryGroup, TrainConfig, validate_name

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from producer.backend import Backend

__all__ = ["Model", "TrainableModel"]

_MIGRATION = (
    "model.train() is deprecated: call `result = await backend.train(model, groups, learning_rate=...)` "
    "then `await model.log(groups, metrics=result.metrics, step=result.step, split='train')`"
)


class Model:
    """A model to sample from through an OpenAI-compatible server.

    Args:
        name, project: 1-64 of ``[A-Za-z0-9._-]``, not starting with ``.``.
        inference_base_url, inference_api_key: the server (set by ``register`` for trainable models).
        inference_model_name: the served name to use instead of ``name@step`` (e.g. a plain base model).
        base_path: where ``log`` writes, under ``{base_path}/{project}/models/{name}``.
    """

    trainable = False

    def __init__(
        self,
        name: str,
        project: str,
        *,
        inference_base_url: str | None = None,
        inference_api_key: str | None = None,
        inference_model_name: str | None = None,
        base_path: str = ".trainq",
    ) -> None:
        self.name = validate_name(name, "model name")
        self.project = validate_name(project, "project")
        self.inference_base_url = inference_base_url
        self.inference_api_key = inference_api_key
        self.inference_model_name = inference_model_name
        self.base_path = base_path
        self._step = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, project={self.project!r})"

    @property
    def model_dir(self) -> Path:
        return Path(self.base_path) / self.project / "models" / self.name

    def get_inference_name(self, step: int | None = None) -> str:
        """``name@step``; ``step=None`` means the latest step this process knows of."""
        if step is None and self.inference_model_name is not None:
            return self.inference_model_name
        return f"{self.name}@{self._step if step is None else step}"

    def openai_client(self, **kwargs: Any) -> AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` pointed at the inference server, with its API key."""
        from openai import AsyncOpenAI

        if self.inference_base_url is None:
            raise RuntimeError(f"{self!r} has no inference_base_url: register it with a backend first")
        return AsyncOpenAI(base_url=self.inference_base_url, api_key=self.inference_api_key or "EMPTY", **kwargs)

    async def log(
        self,
        trajectories_or_groups: list[Trajectory] | list[TrajectoryGroup] | None = None,
        split: str = "val",
        *,
        metrics: dict[str, float] | None = None,
        step: int | None = None,
    ) -> dict[str, float]:
        """Write trajectories and one ``history.jsonl`` line of ``{split}/``-prefixed metrics.

        Trajectories passed without groups are logged as one group. Returns the
        metrics written (aggregates of the groups, overridden by ``metrics``).
        """
        from producer.history import write_log

        validate_name(split, "split")
        groups = _as_groups(trajectories_or_groups)
        return write_log(
            self.model_dir, groups, split=split, step=self._step if step is None else step, metrics=metrics
        )

    def _set_step(self, step: int) -> None:
        self._step = max(self._step, step)


class TrainableModel(Model):
    """A LoRA adapter on ``base_model``, trained step by step by a trainq backend."""

    trainable = True

    def __init__(self, name: str, project: str, base_model: str, **kwargs: Any) -> None:
        super().__init__(name, project, **kwargs)
        if not base_model:
            raise ValueError("base_model must not be empty")
        self.base_model = base_model
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(f"{self!r} is not registered: `await model.register(backend)` first")
        return self._backend

    async def register(self, backend: Backend) -> None:
        """Register with ``backend`` (idempotent); afterwards ``name@0`` is servable."""
        await backend.register(self)

    async def get_step(self) -> int:
        return await self.backend.get_step(self)

    async def train(self, groups: list[TrajectoryGroup], config: TrainConfig | None = None) -> None:
        """Deprecated: ``backend.train`` then ``model.log``, which this does for old code."""
        warnings.warn(_MIGRATION, DeprecationWarning, stacklevel=2)
        options = msgspec.structs.asdict(config) if config else {}
        result = await self.backend.train(self, groups, **options)
        await self.log(groups, metrics=result.metrics, step=result.step, split="train")

    async def delete_checkpoints(self, best_checkpoint_metric: str = "val/reward") -> list[int]:
        """Keep the latest step and the best by ``best_checkpoint_metric`` (higher is better); delete the rest.

        Returns the deleted steps; they are also unloaded from inference.
        """
        from producer.history import read_history

        keep = [await self.get_step()]
        scored = [(row[best_checkpoint_metric], row["step"]) for row in read_history(self.model_dir)
                  if best_checkpoint_metric in row]
        if scored:
            keep.append(max(scored)[1])
        return await self.backend.delete_checkpoints(self, keep)

    def _attach(self, backend: Backend) -> None:
        """Called by a backend's ``register``: where to sample from and where to log."""
        self._backend = backend
        for attr in ("inference_base_url", "inference_api_key"):
            value = getattr(backend, attr, None)
            if value is not None:
                setattr(self, attr, value)
        self.base_path = getattr(backend, "path", self.base_path)


def _as_groups(items: list[Trajectory] | list[TrajectoryGroup] | None) -> list[TrajectoryGroup] | None:
    if not items:
        return None
    if all(isinstance(item, TrajectoryGroup) for item in items):
        return list(items)  # type: ignore[arg-type]
    if all(isinstance(item, Trajectory) for item in items):
        return [TrajectoryGroup(list(items))]  # type: ignore[arg-type]
    raise TypeError("log() takes a list of Trajectory or a list of TrajectoryGroup, not a mix")
