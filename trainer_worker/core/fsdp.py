"""``FSDPWorld``: this process is one rank of a torch.distributed group that trains one model with FSDP2.

Every rank holds a shard of each decoder layer and of the rest of the model
(``fully_shard``), the LoRA weights and their AdamW moments included. A step:

- every rank has the step's sequences (the leader's job, tokenized on each
  rank) and takes a share of about equal tokens (``packing.split_by_tokens``);
- each rank's loss is normalised by the *step's* trained-token count, so the
  ranks' losses add up to the single-process loss; FSDP2 averages gradients
  over ranks, so each loss is multiplied by the number of ranks and the
  reduced gradient is the single-process gradient. (``set_gradient_divide_factor(1.0)``
  would say the same, but gloo has no ``PREMUL_SUM``.)
- every rank runs the same number of forward/backward passes, or FSDP's
  collectives would pair up wrongly: a rank with fewer micro-batches runs a
  filler (the step's shortest sequence) with its loss multiplied by 0;
- gradients are reduced once, after the last micro-batch;
- ``clip_grad_norm_`` on the sharded gradients returns the norm over every
  rank's shard (a DTensor), the same on every rank.

A float64 step on 2 ranks equals the single-process step to about 1e-13
(``tests/integration/trainer/test_group_equivalence.py``).

Checkpoints keep the single-process layout: the adapter and the AdamW state
are gathered to the leader (``get_model_state_dict`` /
``get_optimizer_state_dict``, full and offloaded to its CPU) and written by it.
Loading goes the other way: the leader reads the files and every rank gets
its shards from it (``broadcast_from_rank0``). Only the leader touches the
checkpoint folder, so other nodes need no shared disk.

AdamW with no moments yet is special: torch's state-dict functions first take
an optimizer step with zero gradients to create the moments, which would make
the next real step AdamW's second. Such an optimizer is written as it is
(``state_dict()``, with no moments) and loaded by making a new one.

Small collectives (metric sums, per-rank figures) use a gloo group on the CPU
whatever the device; FSDP and the state-dict functions use the default group
(NCCL on CUDA). Every collective has the group's timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from trainer_worker.core.lora import LoadedModel, TrainingState
from trainer_worker.core.packing import MicroBatch, TrainSequence, split_by_tokens
from trainer_worker.core.world import Build, Phase, RankStats

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import ValueType

__all__ = ["FSDPWorld", "optimizer_by_index", "optimizer_by_name", "setup_world"]


@dataclass
class _Clock:
    """Time in collectives: wall time for those the CPU waits on; on CUDA, FSDP's run on their own
    streams and the CPU does not wait, so those are timed with events and summed at the end."""

    cuda: bool
    seconds: float = 0.0
    events: list[tuple[Any, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.seconds = 0.0
        self.events.clear()

    @contextmanager
    def timing(self, *, on_stream: bool = False) -> Iterator[None]:
        if self.cuda and on_stream:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
            return
        began = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - began

    def total(self) -> float:
        if self.events:
            torch.cuda.synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000.0
            self.events.clear()
        return self.seconds


class _TimedAllGather:
    """FSDP2's all-gather (``FSDPModule.set_custom_all_gather``), timed."""

    def __init__(self, clock: _Clock) -> None:
        self._clock = clock

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> Any:
        with self._clock.timing(on_stream=True):
            return dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


class _TimedReduceScatter(_TimedAllGather):
    """FSDP2's reduce-scatter (``FSDPModule.set_custom_reduce_scatter``), timed."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,  # type: ignore[override]
                 op: Any, async_op: bool = False) -> Any:
        with self._clock.timing(on_stream=True):
            return dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def setup_world(device: str, timeout_s: float) -> FSDPWorld:
    """Join the group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``).

    gloo on the CPU, NCCL on CUDA with one GPU per local rank; every collective
    times out after ``timeout_s`` (on NCCL, the watchdog then ends the process).
    """
    timeout = timedelta(seconds=timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        compute = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=compute)
    elif device == "cpu":
        compute = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    control = dist.new_group(backend="gloo", timeout=timeout)
    return FSDPWorld(compute, control)


class FSDPWorld:
    """This process as one rank of an FSDP2 group; see the module docstring.

    ``on_begin(phase)`` (the leader's) tells the followers a job's collectives
    start; ``on_end()`` runs when they are over. The group server sets both.
    """

    def __init__(self, device: torch.device, control: dist.ProcessGroup) -> None:
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self.device = device
        self.control = control
        self.on_begin: Callable[[Phase], None] = lambda phase: None
        self.on_end: Callable[[], None] = lambda: None
        self.phase_open = False
        """Between ``begin`` and the end of the job's collectives: an error now leaves the ranks out of step."""
        self.figures: list[RankStats] = []
        """Every rank's figures for the last job (the leader's copy; empty elsewhere)."""
        self._clock = _Clock(cuda=device.type == "cuda")
        self._mine = RankStats(rank=self.rank)
        self._began = 0.0
        self._model: Any = None
        self._trainable: list[str] = []  # the model's names of the trainable parameters, optimizer order
        self._saved_keys: dict[str, str] = {}  # peft's saved key -> the model's name

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------- the model

    def load_device(self, device: str) -> str:
        # Loaded whole on the CPU; ``fully_shard`` moves each rank's shards to its device,
        # so a model larger than one GPU never sits whole on one.
        return "cpu"

    def shard(self, loaded: LoadedModel) -> None:
        """``fully_shard`` each decoder layer, then the rest of the (peft) model."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.size,))
        model = loaded.model
        # The base keeps its dtype (bf16 on CUDA: frozen, gathered as it is, never reduced); the LoRA
        # weights keep theirs (fp32 beside a bf16 base, peft's choice) for the forward, the gradient
        # reduction and AdamW: no cast anywhere, as in one process.
        (lora_dtype,) = {p.dtype for p in loaded.trainable_parameters()}
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=lora_dtype)
        # transformers names the classes it never splits between devices: the decoder layers.
        layer_classes = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(f"{type(model.get_base_model()).__name__} names no decoder layer class to shard")
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # torch types these as AllGather and ReduceScatter, ABCs it keeps private
                # (torch.distributed.fsdp._fully_shard._fsdp_api); ours have their methods.
                module.set_custom_all_gather(_TimedAllGather(self._clock))  # type: ignore[arg-type]
                module.set_custom_reduce_scatter(_TimedReduceScatter(self._clock))  # type: ignore[arg-type]
        self._model = model
        self._trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        adapter_name = f".{model.active_adapter}"
        self._saved_keys = {name.replace(adapter_name, ""): name for name in self._trainable}
        if self._saved_keys.keys() != loaded.initial_adapter.keys():
            raise RuntimeError("peft's saved adapter keys do not map one to one onto the model's LoRA parameters")
        loaded.device = self.device

    # ----------------------------------------------------------- the step

    def begin(self, phase: Phase) -> None:
        self._clock.reset()
        self._mine = RankStats(rank=self.rank)
        self._began = time.perf_counter()
        self.phase_open = True
        if self.is_leader:
            self.on_begin(phase)

    def schedule(self, sequences: Sequence[TrainSequence], build: Build) -> Iterator[tuple[MicroBatch, float]]:
        """This rank's micro-batches (loss factor: the number of ranks), then fillers (factor 0) up to
        the most any rank has. Gradients are reduced only on the last one."""
        share = split_by_tokens([len(s.tokens) for s in sequences], self.size)[self.rank]
        mine = build([sequences[i] for i in share]) if share else []
        self._mine.tokens += float(sum(len(sequences[i].tokens) for i in share))
        count = int(self._reduce(torch.tensor([float(len(mine))], dtype=torch.float64), dist.ReduceOp.MAX)[0])
        planned: list[tuple[MicroBatch, float]] = [(batch, float(self.size)) for batch in mine]
        if count > len(mine):
            filler = build([min(sequences, key=lambda s: len(s.tokens))])[0]
            planned += [(filler, 0.0)] * (count - len(mine))
        for index, item in enumerate(planned):
            self._model.set_requires_gradient_sync(index == len(planned) - 1)
            yield item

    def sum(self, totals: dict[str, float]) -> dict[str, float]:
        return self._reduced(totals, dist.ReduceOp.SUM)

    def max(self, maxima: dict[str, float]) -> dict[str, float]:
        return self._reduced(maxima, dist.ReduceOp.MAX)

    def _reduced(self, values: dict[str, float], op: dist.ReduceOp.RedOpType) -> dict[str, float]:
        names = sorted(values)
        reduced = self._reduce(torch.tensor([values[n] for n in names], dtype=torch.float64), op)
        return dict(zip(names, reduced.tolist(), strict=True))

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: float) -> float:
        with self._clock.timing():
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            return float(full)

    def _reduce(self, values: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        with self._clock.timing():
            dist.all_reduce(values, op=op, group=self.control)
        return values

    # ----------------------------------------------------------- state

    def load_state(
        self,
        loaded: LoadedModel,
        state: TrainingState | None,
        *,
        fresh_optimizer: bool,
        new_optimizer: Callable[[], torch.optim.Optimizer],
    ) -> torch.optim.Optimizer:
        """Every rank's shards of ``state``, which only the leader holds."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if self.is_leader and state is None:
            raise RuntimeError("the leader loads a state it has read")
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        with self._clock.timing():
            # broadcast_from_rank0 rewrites the dict it is given: a fresh one each time.
            adapter: dict[str, ValueType] = (
                {self._saved_keys[k]: v for k, v in state.adapter.items()} if state is not None else {}
            )
            set_model_state_dict(self._model, adapter, options=options)
            fresh = new_optimizer()
            if not fresh_optimizer:
                moments = optimizer_by_name(state.optimizer, self._trainable) if state and state.optimizer else {}
                set_optimizer_state_dict(self._model, fresh, moments, options=options)
                _restore_tuples(fresh)
        return fresh

    def checkpoint_writer(
        self, loaded: LoadedModel, optimizer: torch.optim.Optimizer
    ) -> Callable[[Path], None] | None:
        """Gather the adapter and AdamW state to the leader (every rank takes part); the leader's writer."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        with self._clock.timing():
            model_state = get_model_state_dict(self._model, options=options)
            # Every rank took the same steps, so every rank agrees whether there are moments yet.
            moments = get_optimizer_state_dict(self._model, optimizer, options=options) if optimizer.state else None
        self._gather_figures()
        self._end()
        if not self.is_leader:
            return None
        # Not the tied lm_head alias; a full state dict holds plain tensors.
        adapter = {name: cast(torch.Tensor, model_state[name]) for name in self._trainable}
        optimizer_state = optimizer_by_index(moments, self._trainable) if moments else optimizer.state_dict()
        return lambda folder: loaded.write(folder, optimizer_state, model_state=adapter)

    def end_after_agreed_error(self) -> None:
        """Close the job's collectives after an error every rank raised at the same point."""
        self._end()

    def _end(self) -> None:
        if not self.phase_open:
            return
        self.phase_open = False
        if self.is_leader:
            self.on_end()

    def _gather_figures(self) -> None:
        self._mine.collective_s = self._clock.total()
        self._mine.step_s = time.perf_counter() - self._began
        mine = torch.tensor([self._mine.tokens, self._mine.step_s, self._mine.collective_s], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine, group=self.control)
        rows = [t.tolist() for t in every] if self.is_leader else []
        self.figures = [RankStats(rank=r, tokens=tokens, step_s=step_s, collective_s=collective_s)
                        for r, (tokens, step_s, collective_s) in enumerate(rows)]


def _restore_tuples(optimizer: torch.optim.Optimizer) -> None:
    """The state-dict functions hand tuples back as lists (AdamW's ``betas``): make them tuples again,
    so the next checkpoint is written as one process writes it."""
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():
            if isinstance(default, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])


def optimizer_by_name(indexed: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's optimizer layout (parameters by index, as ``optimizer.pt`` holds it) -> the
    state-dict functions' (by name); ``names``: the parameters' names in the optimizer's order."""
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in indexed["param_groups"]]
    return {"state": {names[i]: s for i, s in indexed["state"].items()}, "param_groups": groups}


def optimizer_by_index(named: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of ``optimizer_by_name``: what ``optimizer.state_dict()`` of one process gives."""
    index = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in named["param_groups"]]
    state = sorted(((index[n], s) for n, s in named["state"].items()), key=lambda item: item[0])
    return {"state": dict(state), "param_groups": groups}
