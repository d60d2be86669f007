"""The trainer worker's settings: flags and ``TRAINQ_*`` variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from producer.defaults import DEFAULT_MAX_PAYLOAD_BYTES
from producer.queue import DEFAULT_VISIBILITY_TIMEOUT_S
from producer.settings import ServiceSettings
from trainer_worker.jobs import DEFAULT_LEASE_S, DEFAULT_MAX_ATTEMPTS, DEFAULT_REDIS_RETRY_S

__all__ = ["CPU_MICROBATCH_TOKENS", "CUDA_MICROBATCH_TOKENS", "TrainerSettings"]


# Packed rows cost only their sequences' attention (core/attention.py), so a longer row
# no longer costs more; before that, 512 measured fastest for the local demo on SmolLM2.
# Since, the demo's train step measured about the same at 512 and 2,048 (12.5-15.0 s and
# 11.0-16.6 s a step over two runs each, bench/bench_local_loop.py --max-tokens-per-microbatch),
# and 512 holds a quarter of the activations.
CPU_MICROBATCH_TOKENS = 512
CUDA_MICROBATCH_TOKENS = 8192


class TrainerSettings(ServiceSettings):
    """One trainer worker: serves the train queue of one base model, one job at a time."""

    device: Literal["cpu", "cuda"] = Field("cpu", description="Torch device of the training child process.")
    openmp_wait: Literal["spin", "passive"] = Field(
        "spin",
        description="How the training process's OpenMP threads wait between parallel regions: spin (briefly, "
        "GOMP_SPINCOUNT=10000) or passive (OMP_WAIT_POLICY=PASSIVE: sleep at once). Spinning made a step 1.46x "
        "faster on idle CPUs and 2.4x slower beside a process that keeps every core busy "
        "(bench/bench_trainer.py --compare-wait-policy); in the local CPU stack, where vLLM computes on the same "
        "CPUs only while it samples, spin made the train call 1.04x in-process time against 1.27x passive "
        "(bench/bench_local_loop.py --with-stack). passive: for CPUs another process keeps busy. The "
        "environment's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.",
    )
    max_tokens_per_microbatch: int = Field(
        0,
        ge=0,
        description="Token budget of one packed micro-batch (gradient accumulation covers the rest); "
        f"0 picks {CPU_MICROBATCH_TOKENS} on cpu and {CUDA_MICROBATCH_TOKENS} on cuda.",
    )
    visibility_timeout_s: float = Field(
        DEFAULT_VISIBILITY_TIMEOUT_S,
        ge=3,
        description="Backstop: seconds after which kombu hands out again a taken message that no live worker "
        "renews (a running job's is renewed every third of min(lease, this)); jobs may run longer.",
    )
    lease_s: float = Field(
        DEFAULT_LEASE_S,
        ge=3,
        description="Seconds a job's lease and the queue's leadership last unrenewed: a worker silent this long "
        "is taken for dead, its job handed out again and its queue to a standby.",
    )
    max_attempts: int = Field(
        DEFAULT_MAX_ATTEMPTS,
        ge=1,
        description="A job delivered more often than this without finishing (its worker died each time) fails.",
    )
    redis_retry_s: float = Field(
        DEFAULT_REDIS_RETRY_S,
        gt=0,
        description="How long a job's record write rides out an unreachable Redis; after it the job goes back "
        "to its queue and its next delivery commits the step it made.",
    )
    max_payload_bytes: int = Field(
        DEFAULT_MAX_PAYLOAD_BYTES,
        ge=1024,
        description="A job whose groups payload (or request) is larger is refused before it is decoded.",
    )
    seed: int = Field(0, description="Seed of the LoRA initialisation.")
    hostname: str = Field("", description="Celery worker name (default: trainer@<host>).")
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = Field(
        "auto",
        description="Base model dtype: auto is bfloat16 on cuda, float32 on cpu; float64 is for exactness checks.",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=1024,
        description="Training ranks on this machine (one per GPU on cuda). Above 1, or with --nnodes above 1, "
        "the model trains on a torchrun group with FSDP2; 1 on one node trains in the Celery child.",
    )
    nnodes: int = Field(1, ge=1, le=4096, description="Machines in the training group (torchrun --nnodes).")
    node_rank: int = Field(
        0,
        ge=0,
        description="This machine's place in the group: 0 runs the Celery worker and rank 0; others only "
        "train (torchrun --node-rank).",
    )
    rdzv_endpoint: str = Field(
        "",
        pattern=r"^$|^[^\s:]+:\d{1,5}$",
        description="host:port of node 0 where the group meets (torchrun --rdzv-endpoint, static rendezvous); "
        "needed with --nnodes above 1.",
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Seconds any collective of the training group may wait before the group is restarted.",
    )

    @model_validator(mode="after")
    def _default_microbatch_for_device(self) -> TrainerSettings:
        if self.max_tokens_per_microbatch == 0:
            per_device = CPU_MICROBATCH_TOKENS if self.device == "cpu" else CUDA_MICROBATCH_TOKENS
            self.max_tokens_per_microbatch = per_device
        return self

    @model_validator(mode="after")
    def _group_fits(self) -> TrainerSettings:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint, the host:port of node 0")
        return self

    @property
    def distributed(self) -> bool:
        """Training runs on a torchrun group rather than in the Celery child."""
        return self.nproc_per_node > 1 or self.nnodes > 1
