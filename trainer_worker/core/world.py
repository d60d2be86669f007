"""Where a step runs: one process (``SingleProcess``), or the ranks of a torch.distributed group.

``Trainer`` does the bookkeeping and the math; a ``World`` decides what about
a step depends on how many processes take it, through a few hooks:

    load_device      where the base model is loaded before ``shard``
    shard            wrap the loaded model (FSDP2 shards it; one process leaves it be)
    begin            a job's collective part starts; followers are told what to do
    schedule         this rank's micro-batches, each with the factor its loss is scaled by
    sum              metric sums over ranks
    max              metric maxima over ranks
    clip_grad_norm   clip the gradients to a norm over every rank's shard
    load_state       make a checkpoint's adapter the resident one, and its AdamW state a new AdamW's
    checkpoint_writer  the function that writes the resident state into a folder (leader only)

A step on several ranks is the single-process step, split: each rank takes a
share of the step's sequences, and the sums come out the same (see ``fsdp``).
``SingleProcess`` is the identity of each hook, so a one-process step is
exactly what it was without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec

if TYPE_CHECKING:
    import torch

    from trainer_worker.core.lora import LoadedModel, TrainingState
    from trainer_worker.core.packing import MicroBatch, TrainSequence

__all__ = ["Phase", "RankStats", "SingleProcess", "World"]

Build = Callable[["Sequence[TrainSequence]"], "list[MicroBatch]"]


class Phase(msgspec.Struct, frozen=True, kw_only=True):
    """What the leader tells followers at ``begin``: the part of a job every rank runs."""

    latest: int
    """The model's step before the job (staleness is measured from it)."""
    load: bool
    """A checkpoint's state is made resident first (the leader's files, broadcast)."""
    fresh_optimizer: bool = False
    """With ``load``: the checkpoint has no AdamW moments, so a new AdamW is made."""


class RankStats(msgspec.Struct, kw_only=True):
    """One rank's part of the last job that ran collectives."""

    rank: int
    tokens: float = 0.0
    """Tokens this rank forwarded (its share; padding and fillers not counted)."""
    step_s: float = 0.0
    """From ``begin`` to the end of the job's collectives."""
    collective_s: float = 0.0
    """In collectives: FSDP's all-gathers and reduce-scatters, the state dicts, the sums."""


class World(Protocol):
    rank: int
    size: int

    @property
    def is_leader(self) -> bool: ...

    def load_device(self, device: str) -> str: ...

    def shard(self, loaded: LoadedModel) -> None: ...

    def begin(self, phase: Phase) -> None: ...

    def schedule(self, sequences: Sequence[TrainSequence], build: Build) -> Iterator[tuple[MicroBatch, float]]: ...

    def sum(self, totals: dict[str, float]) -> dict[str, float]: ...

    def max(self, maxima: dict[str, float]) -> dict[str, float]: ...

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: float) -> float: ...

    def load_state(
        self,
        loaded: LoadedModel,
        state: TrainingState | None,
        *,
        fresh_optimizer: bool,
        new_optimizer: Callable[[], torch.optim.Optimizer],
    ) -> torch.optim.Optimizer: ...

    def checkpoint_writer(
        self, loaded: LoadedModel, optimizer: torch.optim.Optimizer
    ) -> Callable[[Path], None] | None: ...


class SingleProcess:
    """The whole step in this process: every hook is the identity."""

    rank = 0
    size = 1

    @property
    def is_leader(self) -> bool:
        return True

    def load_device(self, device: str) -> str:
        return device

    def shard(self, loaded: LoadedModel) -> None:
        return None

    def begin(self, phase: Phase) -> None:
        return None

    def schedule(self, sequences: Sequence[TrainSequence], build: Build) -> Iterator[tuple[MicroBatch, float]]:
        return ((batch, 1.0) for batch in build(sequences))

    def sum(self, totals: dict[str, float]) -> dict[str, float]:
        return totals

    def max(self, maxima: dict[str, float]) -> dict[str, float]:
        return maxima

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: float) -> float:
        import torch

        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))

    def load_state(
        self,
        loaded: LoadedModel,
        state: TrainingState | None,
        *,
        fresh_optimizer: bool,
        new_optimizer: Callable[[], torch.optim.Optimizer],
    ) -> torch.optim.Optimizer:
        if state is None:
            raise RuntimeError("one process loads the state it read itself; got none")
        loaded.set_adapter_state(state.adapter)
        optimizer = new_optimizer()
        if not fresh_optimizer and state.optimizer is not None:  # not fresh: it has moments
            optimizer.load_state_dict(state.optimizer)
        return optimizer

    def checkpoint_writer(
        self, loaded: LoadedModel, optimizer: torch.optim.Optimizer
    ) -> Callable[[Path], None] | None:
        return lambda folder: loaded.save(folder, optimizer)
