"""``Trainer``: one base model, one resident LoRA adapter, many trainable models.

Each train job makes exactly one new checkpoint step of one model, on top of the
step it is given (the worker's committed step in Redis; the newest on disk when
used in process). The adapter in memory belongs to one ``(model, step)`` at a
time; a job for another model, or after anything went wrong, first loads that
step (adapter and optimizer) from disk, so a restarted trainer resumes exactly
where the last one stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from producer.types import JobOutcome, ModelRef, TrainConfig, TrajectoryGroup
from producer.validation import validate_groups
from trainer_worker.core import checkpoints
from trainer_worker.core.attention import ATTENTION
from trainer_worker.core.batch import PreparedBatch, prepare_batch
from trainer_worker.core.forward import per_token_logps
from trainer_worker.core.lora import (
    DEFAULT_LORA_TARGETS,
    LoadedModel,
    LoraSettings,
    TrainingState,
    resolve_dtype,
    setup_model,
)
from trainer_worker.core.loss import LossConfig, LossInputs, compute_loss, loss_config_from_train_config
from trainer_worker.core.packing import MicroBatch, PackingMode, TrainSequence, build_microbatches
from trainer_worker.core.tokenize import tokenize_trajectory
from trainer_worker.core.world import Phase, SingleProcess, World

Writer = checkpoints.Writer

__all__ = ["MAX_GRAD_NORM", "Trainer"]

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0
_LOSS_METRICS = (
    "loss", "policy_loss", "kl", "clip_fraction", "ratio_mean",
    "mismatch_kl_k3", "mismatch_logprob_abs_diff", "mismatch_ratio_mean",
)
_SUMMED = (*_LOSS_METRICS, "num_microbatches")  # summed over micro-batches, and over ranks
_MAX_METRICS = ("mismatch_ratio_max",)  # the largest over micro-batches, and over ranks


class Trainer:
    """Trains LoRA adapters of one base model, one checkpoint step per job.

    Args:
        base_model_path: a local model folder (or hub id) with a chat template.
        checkpoint_root: the folder holding ``{project}/{name}/checkpoints/{step:04d}``.
        device: ``"cpu"`` (float32) or ``"cuda"`` (bfloat16 base, float32 adapter).
        max_tokens_per_microbatch: token budget of one forward/backward, padding included.
        seed: seeds the adapter's initialisation, identical for every model's step 0.
        lora_r, lora_alpha, lora_targets: the LoRA adapter's shape.
        packing: ``"packed"`` (several sequences per row) or ``"padded"``.
        attn_implementation: per-sequence causal attention (``attention.ATTENTION``, the default)
            or one of transformers' (``"sdpa"``), kept for comparison.
        dtype: the base model's dtype: ``"auto"`` (bfloat16 on CUDA, float32 on the CPU),
            ``"float32"``, ``"bfloat16"`` or ``"float64"`` (for exactness checks).
        world: where a step runs (``world.SingleProcess`` by default); a ``fsdp.FSDPWorld``
            makes this trainer one rank of a group. Only the leader's public methods are
            called; the other ranks run ``follow`` for each job the leader begins.
    """

    def __init__(
        self,
        base_model_path: str,
        checkpoint_root: str,
        *,
        device: str = "cpu",
        max_tokens_per_microbatch: int = 8192,
        seed: int = 0,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_targets: tuple[str, ...] | None = None,
        packing: PackingMode = "packed",
        attn_implementation: str = ATTENTION,
        dtype: str = "auto",
        world: World | None = None,
    ) -> None:
        if max_tokens_per_microbatch < 1:
            raise ValueError(f"max_tokens_per_microbatch must be >= 1, got {max_tokens_per_microbatch}")
        lora = LoraSettings(r=lora_r, alpha=lora_alpha, targets=tuple(lora_targets or DEFAULT_LORA_TARGETS))
        self.base_model_path = base_model_path
        self.checkpoint_root = Path(checkpoint_root)
        self.max_tokens_per_microbatch = max_tokens_per_microbatch
        self.packing: PackingMode = packing
        self.world: World = world or SingleProcess()
        self._loaded: LoadedModel = setup_model(
            base_model_path, self.world.load_device(device), lora, seed, attn_implementation,
            resolve_dtype(dtype, device),
        )
        self.world.shard(self._loaded)
        self._optimizer = self._new_optimizer()
        self._resident: tuple[str, int] | None = None  # (model key, step) the adapter in memory is

    # ------------------------------------------------------------------ public

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (with its chat template)."""
        return self._loaded.tokenizer

    @property
    def num_base_parameters(self) -> int:
        """Parameters of the base model, LoRA excluded (the ``N`` of ``6 * N * tokens``)."""
        return sum(p.numel() for p in self._loaded.model.parameters() if not p.requires_grad)

    def latest_step(self, model: ModelRef) -> int | None:
        """The model's newest checkpoint step, ``None`` if it is not registered."""
        model.validate()
        return checkpoints.latest_step(self.checkpoint_root, model.project, model.name)

    def register(self, model: ModelRef, *, writer: Writer = checkpoints.UNFENCED) -> JobOutcome:
        """Write step 0 (the untrained adapter, fresh optimizer) unless the model has a step; idempotent.

        Returns the outcome recorded with the model's latest step.
        """
        model.validate()
        latest = self.latest_step(model)
        if latest is not None:
            return self.outcome_of(model, latest)
        self._resident = None
        self.world.begin(Phase(latest=-1, load=True, fresh_optimizer=True))
        self._load(TrainingState(adapter=self._loaded.initial_adapter, optimizer=None), fresh_optimizer=True)
        path = self._save(model, 0, job_id="", metrics={}, train_s=0.0, writer=writer)
        self._resident = (model.key, 0)
        log.info("registered %s at %s", model.key, path)
        return self._info(model, 0).outcome()

    def outcome_of(self, model: ModelRef, step: int) -> JobOutcome:
        """What ``step`` of ``model`` recorded (path, metrics), after checking the model's base model."""
        model.validate()
        self._check_base_model(model, step)
        return self._info(model, step).outcome()

    def forget(self) -> None:
        """Reload from disk before the next job: the step last saved was not committed, so memory may be ahead."""
        self._resident = None

    def train(
        self, job_id: str, model: ModelRef, config: TrainConfig, groups: list[TrajectoryGroup], *,
        base_step: int | None = None, writer: Writer = checkpoints.UNFENCED,
    ) -> JobOutcome:
        """Run one train job: exactly one new step of ``model``, ``base_step + 1``, saved atomically.

        ``base_step`` is the model's committed step (default: the newest on disk,
        and a job whose id that step carries is not run again). A folder already at
        ``base_step + 1`` is a write that was never committed: if this job wrote it,
        its outcome is returned without training (metrics as saved, so without
        ``checkpoint_save_s``, and ``train_s`` up to the save); another job's is set
        aside. ``train_s`` of a fresh outcome includes the save. Raises
        ``ValueError`` naming the problem for bad input (unregistered model,
        malformed groups, token ids outside the vocabulary, sequences longer than
        the model's positions); the trainer stays usable for the next job.
        """
        started = time.perf_counter()
        model.validate()
        if not job_id:
            raise ValueError("job_id must not be empty")
        if base_step is None:
            base_step = self.latest_step(model)
            newest = self._info(model, base_step) if base_step is not None else None
            if newest is not None and newest.job_id == job_id:
                log.info("job %s already made step %d of %s; not training again", job_id, base_step, model.key)
                return newest.outcome()
        if base_step is None:
            raise ValueError(f"model {model.key} is not registered (no checkpoint under {self.checkpoint_root})")
        latest = base_step
        self._check_base_model(model, latest)
        made = self._uncommitted(model, job_id, latest + 1, writer)
        if made is not None:
            return made.outcome()
        validate_groups(groups, allow_missing_logprobs=config.allow_training_without_logprobs)
        batch = self._prepare(groups, latest, config)
        prepared = time.perf_counter()

        step = latest + 1
        learning_rate = effective_learning_rate(config, batch.metrics)
        # Read before ``begin``: once followers are told to load, the leader must have something to send.
        state = None if self._resident == (model.key, latest) else self._read(model, latest)
        try:
            self.world.begin(Phase(latest=latest, load=state is not None,
                                   fresh_optimizer=state is not None and state.fresh_optimizer))
            self._activate(model, latest, state)
            loaded = time.perf_counter()
            step_metrics = self._optimize(batch.sequences, loss_config_from_train_config(config), learning_rate)
            metrics = _finite({**batch.metrics, **step_metrics, "learning_rate": learning_rate,
                               "num_ranks": float(self.world.size), "time_prepare_s": prepared - started,
                               "time_load_s": loaded - prepared})
            train_s = time.perf_counter() - started
            metrics["train_s"] = train_s
            saving = time.perf_counter()
            path = self._save(model, step, job_id=job_id, metrics=metrics, train_s=train_s, writer=writer)
            save_s = time.perf_counter() - saving
        except BaseException:
            # Memory may be half a step ahead of disk now; reload from disk next time.
            self._resident = None
            self._optimizer.zero_grad(set_to_none=True)
            raise
        self._resident = (model.key, step)
        train_s = time.perf_counter() - started
        log.info("job %s: %s step %d, %d tokens, %.2f s", job_id, model.key, step, metrics["num_tokens"], train_s)
        # The save's own duration cannot be inside the checkpoint it measures: returned only.
        metrics = {**metrics, "checkpoint_save_s": save_s}
        return JobOutcome(step=step, metrics=metrics, checkpoint_path=str(path), train_s=train_s)

    def follow(self, phase: Phase, config: TrainConfig | None, groups: list[TrajectoryGroup] | None) -> None:
        """A follower rank's part of a job its leader began: the same collectives, in the same order.

        ``groups`` is ``None`` for a registration (the untrained adapter, then
        the gather of step 0). The leader checked the job before ``begin``, so
        an error here means this rank is out of step with the others.
        """
        batch = None if groups is None or config is None else self._prepare(groups, phase.latest, config)
        self.world.begin(phase)
        try:
            if phase.load:
                self._load(None, fresh_optimizer=phase.fresh_optimizer)
            if batch is not None and config is not None:
                learning_rate = effective_learning_rate(config, batch.metrics)
                self._optimize(batch.sequences, loss_config_from_train_config(config), learning_rate)
            self.world.checkpoint_writer(self._loaded, self._optimizer)
        except BaseException:
            self._optimizer.zero_grad(set_to_none=True)
            raise

    def delete_checkpoints(
        self, model: ModelRef, keep_steps: list[int], *, latest: int | None = None,
        writer: Writer = checkpoints.UNFENCED,
    ) -> list[int]:
        """Delete every step of ``model`` not in ``keep_steps``, except ``latest`` (default: the newest on disk)
        and any step beyond it; return those deleted."""
        model.validate()
        existing = checkpoints.list_steps(self.checkpoint_root, model.project, model.name)
        doomed = [s for s in existing if s not in set(keep_steps)]
        return checkpoints.delete_steps(self.checkpoint_root, model.project, model.name, doomed,
                                        latest=latest, writer=writer)

    # ----------------------------------------------------------------- private

    def _new_optimizer(self) -> torch.optim.Optimizer:
        # No weight decay: it would pull the LoRA weights toward 0 on every step,
        # moving the policy even when a job has no trainable group.
        return torch.optim.AdamW(self._loaded.trainable_parameters(), lr=1e-6, weight_decay=0.0)

    def _info(self, model: ModelRef, step: int) -> checkpoints.CheckpointInfo:
        return checkpoints.read_info(self.checkpoint_root, model.project, model.name, step)

    def _uncommitted(self, model: ModelRef, job_id: str, step: int, writer: Writer) -> checkpoints.CheckpointInfo | None:
        """An uncommitted step's checkpoint if ``job_id`` made it (to commit, not train again); another job's is
        set aside."""
        info = checkpoints.read_info_if_any(self.checkpoint_root, model.project, model.name, step)
        if info is None or info.job_id == job_id:
            if info is not None:
                log.info("job %s made step %d of %s before; committing it, not training again", job_id, step, model.key)
            return info
        log.warning("step %d of %s on disk is job %s's, never committed; setting it aside for job %s",
                    step, model.key, info.job_id or "(none)", job_id)
        checkpoints.set_aside(self.checkpoint_root, model.project, model.name, step, writer)
        return None

    def _check_base_model(self, model: ModelRef, latest: int) -> None:
        registered = self._info(model, latest).base_model
        if registered and registered != model.base_model:
            raise ValueError(
                f"model {model.key} was registered with base model {registered!r}, not {model.base_model!r}"
            )

    def _prepare(self, groups: list[TrajectoryGroup], latest: int, config: TrainConfig) -> PreparedBatch:
        tokenize = partial(
            tokenize_trajectory,
            tokenizer=self._loaded.tokenizer,
            vocab_size=self._loaded.vocab_size,
            max_length=self._loaded.max_positions,
            allow_missing_logprobs=config.allow_training_without_logprobs,
        )
        return prepare_batch(groups, latest, config, tokenize)

    def _read(self, model: ModelRef, step: int) -> TrainingState:
        return self._loaded.read(checkpoints.checkpoint_dir(self.checkpoint_root, model.project, model.name, step))

    def _activate(self, model: ModelRef, step: int, state: TrainingState | None) -> None:
        """Make ``state`` (``model`` at ``step``) the resident adapter and optimizer; ``None``: it is already."""
        if state is None:
            return
        self._resident = None
        self._load(state, fresh_optimizer=state.fresh_optimizer)
        self._resident = (model.key, step)

    def _load(self, state: TrainingState | None, *, fresh_optimizer: bool) -> None:
        self._optimizer = self.world.load_state(
            self._loaded, state, fresh_optimizer=fresh_optimizer, new_optimizer=self._new_optimizer
        )

    def _save(self, model: ModelRef, step: int, *, job_id: str, metrics: dict[str, float], train_s: float,
              writer: Writer) -> Path:
        metadata = {
            "job_id": job_id,
            "base_model": model.base_model,
            "project": model.project,
            "name": model.name,
            "metrics": metrics,
            "train_s": train_s,
        }
        write_files = self.world.checkpoint_writer(self._loaded, self._optimizer)
        if write_files is None:
            raise RuntimeError("only the leader rank writes checkpoints")
        return checkpoints.write_checkpoint(
            self.checkpoint_root, model.project, model.name, step, write_files, metadata, writer
        )

    def _optimize(self, sequences: list[TrainSequence], loss_config: LossConfig, learning_rate: float) -> dict[str, float]:
        """Forward/backward every micro-batch, clip, and take one AdamW step (none without sequences)."""
        totals: dict[str, float] = defaultdict(float)
        maxima: dict[str, float] = dict.fromkeys(_MAX_METRICS, 0.0)
        num_tokens = sum(s.tokens.num_trained_tokens for s in sequences)
        num_known = sum(sum(s.tokens.logprobs_known) for s in sequences)
        if num_tokens == 0:
            # Nothing to learn from: no optimizer step at all, so weights and AdamW moments stay as they are.
            zeros = (*_LOSS_METRICS, *_MAX_METRICS, "grad_norm", "num_tokens", "num_sequence_tokens",
                     "num_microbatches", "time_forward_backward_s", "time_optimizer_s")
            return dict.fromkeys(zeros, 0.0)
        pad_id = self._loaded.tokenizer.pad_token_id or 0
        build = partial(build_microbatches, max_tokens=self.max_tokens_per_microbatch, mode=self.packing,
                        pad_token_id=pad_id)
        model = self._loaded.model
        model.train()
        self._optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        # A rank's loss is its share of the step's (normalised by the step's token count); the
        # world's factor undoes what its gradient reduction divides by, 0 for a filler micro-batch.
        for batch, loss_scale in self.world.schedule(sequences, build):
            outputs = compute_loss(self._loss_inputs(batch, loss_config, num_tokens, num_known), loss_config)
            (outputs.loss * loss_scale).backward()
            if loss_scale:
                totals["num_microbatches"] += 1
                for name, value in outputs.metrics.items():
                    totals[name] += value
                for name, value in outputs.max_metrics.items():
                    maxima[name] = max(maxima[name], value)
        totals = self.world.sum({name: totals[name] for name in _SUMMED})
        maxima = self.world.max(maxima)
        backward_done = time.perf_counter()
        params = self._loaded.trainable_parameters()
        grad_norm = self.world.clip_grad_norm(params, MAX_GRAD_NORM)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"gradient norm is {grad_norm}; the step was not applied")
        for group in self._optimizer.param_groups:
            group["lr"] = learning_rate
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return {
            **{name: totals[name] for name in _LOSS_METRICS},
            **maxima,
            "time_forward_backward_s": backward_done - started,
            "time_optimizer_s": time.perf_counter() - backward_done,
            "grad_norm": grad_norm,
            "num_tokens": float(num_tokens),
            "num_sequence_tokens": float(sum(len(s.tokens) for s in sequences)),
            "num_microbatches": totals["num_microbatches"],
        }

    def _loss_inputs(self, batch: MicroBatch, loss_config: LossConfig, num_tokens: int, num_known: int) -> LossInputs:
        device = self._loaded.device
        model = self._loaded.model
        ref_logps = None
        if loss_config.beta > 0:
            with torch.no_grad(), model.disable_adapter():
                ref_logps = per_token_logps(model, batch, device)  # (B, T)
        logps = per_token_logps(model, batch, device)  # (B, T)
        known = batch.logps_known.to(device)
        # Without sampler logprobs the trainer's own (detached) stand in: ratio 1.
        old_logps = torch.where(known, batch.old_per_token_logps.to(device), logps.detach())
        return LossInputs(
            per_token_logps=logps,
            old_per_token_logps=old_logps,
            advantages=batch.advantages.to(device),
            loss_mask=batch.loss_mask.to(device),
            sequence_ids=batch.sequence_ids.to(device),
            num_sequences=batch.num_sequences,
            ref_per_token_logps=ref_logps,
            token_normalizer=float(num_tokens),
            sampler_logps_known=known,
            known_token_normalizer=float(num_known),
        )


def effective_learning_rate(config: TrainConfig, batch_metrics: dict[str, float]) -> float:
    """``config.learning_rate``, scaled as ART's learning-rate options ask.

    ``scale_learning_rate_by_reward_std_dev``: times the step's mean within-group
    reward standard deviation; ``num_trajectories_learning_rate_multiplier_power``
    ``p``: times (trajectories trained) ** p.
    """
    rate = config.learning_rate
    if config.scale_learning_rate_by_reward_std_dev:
        rate *= batch_metrics["reward_std_dev"]
    if config.num_trajectories_learning_rate_multiplier_power:
        rate *= max(batch_metrics["num_trajectories"], 1.0) ** config.num_trajectories_learning_rate_multiplier_power
    return rate


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics as plain floats; a NaN or infinity becomes 0.0 (JSON and Prometheus want finite numbers)."""
    return {name: (float(v) if math.isfinite(float(v)) else 0.0) for name, v in metrics.items()}
