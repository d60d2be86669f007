"""Settings: each one a ``--flag`` and a ``TRAINQ_FLAG`` environment variable.

Workers subclass ``ServiceSettings`` and add their own fields; ``parse_settings``
reads the command line over the environment over the defaults, and a bad value
fails at start with the setting's name. ``ClientSettings`` is what the SDK's
own processes (the ``trainq`` command, ``LocalBackend``, the model cache) read
from the environment. Only pydantic is imported here, never torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.defaults import DEFAULT_PATH

__all__ = ["DEFAULT_REDIS_URL", "ClientSettings", "RedisUrl", "ServiceSettings", "parse_settings"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

RedisUrl = Annotated[str, Field(pattern=r"^rediss?://")]
"""A Redis URL as redis-py reads it: ``redis://`` or ``rediss://``, with the password if any."""


class ServiceSettings(BaseSettings):
    """Settings every trainq service shares."""

    model_config = SettingsConfigDict(
        env_prefix="TRAINQ_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
        validate_default=True,
    )

    redis_url: RedisUrl = Field(
        DEFAULT_REDIS_URL,
        description="Redis URL of the broker and job records (redis://, rediss://, with password if any).",
    )
    base_model: str = Field(
        ...,
        description="Base model: a local folder, a hub id, or trainq/smollm2-135m-instruct (the embedded default).",
        min_length=1,
    )
    checkpoint_root: str = Field(f"{DEFAULT_PATH}/checkpoints", description="Folder that holds every model's checkpoints.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 disables it.")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Logging level.")


class ClientSettings(BaseSettings):
    """What the SDK's own processes read from the environment; each field's variable is named in its doc."""

    # An empty variable counts as unset, as a shell's `VAR= trainq status` means.
    model_config = SettingsConfigDict(env_prefix="TRAINQ_", env_ignore_empty=True, extra="ignore",
                                      populate_by_name=True)

    redis_url: RedisUrl | None = Field(
        default=None, description="TRAINQ_REDIS_URL: the stack `trainq status` and `trainq jobs` read, unless --redis-url."
    )
    # Not checked here: a common variable that other tools set too, and redis-py reads more forms (unix://).
    local_redis_url: str | None = Field(
        default=None,
        validation_alias="REDIS_URL",
        description="REDIS_URL: a Redis for LocalBackend to use instead of starting its own.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: _xdg_cache_home() / "trainq",
        description="TRAINQ_CACHE_DIR: trainq's cache root (the embedded default model); "
        "$XDG_CACHE_HOME/trainq, else ~/.cache/trainq.",
    )


def _xdg_cache_home() -> Path:
    # The freedesktop convention every cache on Linux follows, not a trainq setting of its own.
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def client_settings() -> ClientSettings:
    """The environment as it is now, read and checked; a bad value is a ``ValueError`` naming the variable."""
    try:
        return ClientSettings()
    except ValidationError as exc:
        problems = "; ".join(f"{_variable(str(err['loc'][0]))}: {err['msg']}" for err in exc.errors())
        raise ValueError(f"invalid environment: {problems}") from None


def _variable(loc: str) -> str:
    """The environment variable of a validation error's location: an alias as it is, a field with the prefix."""
    return loc if loc.isupper() else f"TRAINQ_{loc.upper()}"


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
