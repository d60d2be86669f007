"""The trainer worker's settings: flags and ``TRAINQ_*`` variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from producer.queue import DEFAULT_VISIBILITY_TIMEOUT_S
from producer.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """One trainer worker: serves the train queue of one base model, one job at a time."""

    device: Literal["cpu", "cuda"] = Field("cpu", description="Torch device of the training child process.")
    max_tokens_per_microbatch: int = Field(
        8192, ge=64, description="Token budget of one packed micro-batch (gradient accumulation covers the rest)."
    )
    visibility_timeout_s: float = Field(
        DEFAULT_VISIBILITY_TIMEOUT_S,
        gt=0,
        description="Seconds before Redis re-delivers a taken, unacknowledged job; must exceed the longest job.",
    )
    max_payload_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="A job whose groups payload (or request) is larger is refused before it is decoded.",
    )
    seed: int = Field(0, description="Seed of the LoRA initialisation.")
    hostname: str = Field("", description="Celery worker name (default: trainer@<host>).")
