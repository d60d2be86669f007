"""``Model`` (something to sample from) and ``TrainableModel`` (a LoRA trained by trainq)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from producer._warn import warn_once
from producer.defaults import DEFAULT_PATH
from producer.names import inference_name, validate_name
from producer.types import TrainConfig, Trajectory, TrajectoryGroup

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from producer.backend import Backend, TrainOptions

__all__ = ["Model", "TrainableModel"]

ConfigT = TypeVar("ConfigT")

_MIGRATION = (
    "model.train() is deprecated: call `result = await backend.train(model, groups, learning_rate=...)` "
    "then `await model.log(groups, metrics=result.metrics, step=result.step, split='train')`"
)


class Model(Generic[ConfigT]):
    """A model to sample from through an OpenAI-compatible server.

    Args:
        name, project: 1-64 of ``[A-Za-z0-9._-]``, not starting with ``.``.
        inference_base_url, inference_api_key: the server (set by ``register``
            when not given, and always for trainable models).
        inference_model_name: the name the server serves the model under; defaults to ``name``.
        base_path: where ``log`` writes, under ``{base_path}/{project}/models/{name}``.
        config: anything rollout code wants to carry with the model (ART's ``model.config``).
        entity, id, report_metrics: accepted for ART's code; trainq writes metrics to
            ``history.jsonl`` and reports to no tracking service.
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
        base_path: str = DEFAULT_PATH,
        config: ConfigT | None = None,
        entity: str | None = None,
        id: str | None = None,  # noqa: A002 - ART's name
        report_metrics: list[str] | None = None,
    ) -> None:
        self.name = validate_name(name, "model name")
        self.project = validate_name(project, "project")
        self.inference_base_url = inference_base_url
        self.inference_api_key = inference_api_key
        self.inference_model_name = inference_model_name
        self.base_path = base_path
        self.config = config
        self.entity = entity
        self.id = id
        self.report_metrics = report_metrics
        if report_metrics:
            warn_once(f"report_metrics={report_metrics!r}: trainq writes metrics to history.jsonl and "
                       "reports them to no tracking service (`trainq plot` draws them)")
        self._step = 0
        self._clients: dict[str, AsyncOpenAI] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, project={self.project!r})"

    @property
    def model_dir(self) -> Path:
        return Path(self.base_path) / self.project / "models" / self.name

    async def register(self, backend: Backend) -> None:
        """Log under ``backend``'s path and sample from its inference server unless told another one."""
        self._attach(backend)

    async def get_step(self) -> int:
        """A model trainq does not train has one step, 0."""
        return 0

    def get_inference_name(self, step: int | None = None) -> str:
        """The name to put in a request's ``model``: ``inference_model_name``, else ``name``."""
        return self.inference_model_name or self.name

    def openai_client(self, **kwargs: Any) -> AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` on the inference server, with its API key.

        One client per model (and per set of ``kwargs``), made on first use and
        reused after: rollout code may call this once per request. The
        backend's ``close()`` closes it; closing it yourself (``async with``)
        is fine too, the next call makes a new one.
        """
        from openai import AsyncOpenAI

        if self.inference_base_url is None:
            raise RuntimeError(f"{self!r} has no inference_base_url: register it with a backend first")
        key = repr(sorted(kwargs.items()))
        client = self._clients.get(key)
        if client is None or client.is_closed():
            client = AsyncOpenAI(base_url=self.inference_base_url, api_key=self.inference_api_key or "EMPTY", **kwargs)
            self._clients[key] = client
        return client

    async def close(self) -> None:
        """Close the clients ``openai_client`` made."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def log(
        self,
        trajectories_or_groups: Iterable[Trajectory | TrajectoryGroup | BaseException] | None = None,
        split: str = "val",
        *,
        metrics: Mapping[str, float] | None = None,
        step: int | None = None,
        trajectories: Iterable[Trajectory | TrajectoryGroup | BaseException] | None = None,
    ) -> dict[str, float]:
        """Write trajectories and one ``history.jsonl`` line of ``{split}/``-prefixed metrics.

        Trajectories (and exceptions) passed without groups are logged as one
        group; ``trajectories=`` is ART's name for the first argument. Returns
        the metrics written (aggregates of the groups, overridden by ``metrics``).
        """
        from producer.history import write_log

        if trajectories is not None:
            if trajectories_or_groups is not None:
                raise TypeError("log() got both trajectories_or_groups and trajectories; pass one")
            trajectories_or_groups = trajectories
        validate_name(split, "split")
        return write_log(
            self.model_dir, trajectories_or_groups, split=split, step=self._step if step is None else step,
            metrics=metrics,
        )

    def _set_step(self, step: int) -> None:
        self._step = max(self._step, step)

    def _attach(self, backend: Backend) -> None:
        """Where to log, where to sample from, and who closes the clients: ``backend``."""
        for attr in ("inference_base_url", "inference_api_key"):
            value = getattr(backend, attr, None)
            if value is not None and (self.trainable or getattr(self, attr) is None):
                setattr(self, attr, value)
        self.base_path = getattr(backend, "path", self.base_path)
        backend._track(self)


class TrainableModel(Model[ConfigT]):
    """A LoRA adapter on ``base_model``, trained step by step by a trainq backend.

    ``_internal_config`` (ART's ``art.dev.InternalModelConfig``) is accepted:
    trainq's workers are configured by their own flags, so each setting in it
    is reported once as ignored (see ``producer.art.dev``).
    """

    trainable = True

    def __init__(
        self, name: str, project: str, base_model: str, *, _internal_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, project, **kwargs)
        if not base_model:
            raise ValueError("base_model must not be empty")
        self.base_model = base_model
        self._internal_config = _internal_config
        self._backend: Backend | None = None

    @property
    def _internal_config(self) -> Mapping[str, Any] | None:
        return self._internal_config_value

    @_internal_config.setter
    def _internal_config(self, config: Mapping[str, Any] | None) -> None:
        # ART's examples set it after construction too.
        if config:
            from producer.art.dev import warn_ignored_internal_config

            warn_ignored_internal_config(config)
        self._internal_config_value = config

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(f"{self!r} is not registered: `await model.register(backend)` first")
        return self._backend

    def get_inference_name(self, step: int | None = None) -> str:
        """``name@step``; ``step=None`` means the latest step this process knows of."""
        return inference_name(self.name, self._step if step is None else step)

    async def register(self, backend: Backend) -> None:
        """Register with ``backend`` (idempotent); afterwards ``name@0`` is servable."""
        await backend.register(self)

    async def get_step(self) -> int:
        return await self.backend.get_step(self)

    async def train(
        self,
        trajectory_groups: Iterable[TrajectoryGroup],
        config: TrainConfig | None = None,
        _config: TrainOptions | None = None,
        verbose: bool = False,
    ) -> None:
        """Deprecated: ``backend.train`` then ``model.log``, which this does for old code.

        ``_config`` (ART's ``art.dev.TrainConfig``) adds keywords of ``backend.train``.
        """
        warnings.warn(_MIGRATION, DeprecationWarning, stacklevel=2)
        groups = list(trajectory_groups)
        options: dict[str, Any] = msgspec.structs.asdict(config) if config else {}
        options.update(_config or {})
        if verbose:
            options["verbose"] = True
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
        super()._attach(backend)
        self._backend = backend

