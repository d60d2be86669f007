"""Service settings: each one a ``--flag`` and a ``TRAINQ_FLAG`` environment variable.

Workers subclass ``ServiceSettings`` and add their own fields; ``parse_settings``
reads the command line over the environment over the defaults, and a bad value
fails at start with the setting's name. Only pydantic is imported here, never torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.defaults import DEFAULT_PATH

__all__ = ["ServiceSettings", "parse_settings"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class ServiceSettings(BaseSettings):
    """Settings every trainq service shares."""

    model_config = SettingsConfigDict(
        env_prefix="TRAINQ_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
        validate_default=True,
    )

    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Redis URL of the broker and job records (redis://, rediss://, with password if any).",
        pattern=r"^rediss?://",
    )
    base_model: str = Field(
        ...,
        description="Base model: a local folder, a hub id, or trainq/smollm2-135m-instruct (the embedded default).",
        min_length=1,
    )
    checkpoint_root: str = Field(f"{DEFAULT_PATH}/checkpoints", description="Folder that holds every model's checkpoints.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 disables it.")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Logging level.")


S = TypeVar("S", bound=BaseSettings)


def parse_settings(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """Build ``cls`` from ``argv`` (flags), ``TRAINQ_*`` variables and defaults; exit 2 on a bad value."""
    import sys

    try:
        return cls(_cli_parse_args=list(sys.argv[1:] if argv is None else argv), _cli_prog_name=prog)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in exc.errors()
        )
        raise SystemExit(f"{prog or cls.__name__}: invalid settings: {problems}") from None
