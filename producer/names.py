"""Names of projects, models and served checkpoints.

Names become folder names under the checkpoint root and parts of Redis keys,
so they are checked before any I/O: 1-64 of ``[A-Za-z0-9._-]``, not starting
with ``.`` (which rules out ``.`` and ``..``). A served checkpoint is
``name@step``.
"""

from __future__ import annotations

import re

__all__ = ["inference_name", "parse_inference_name", "validate_name"]

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_INFERENCE_NAME_RE = re.compile(r"(?P<name>[A-Za-z0-9._-]{1,64})@(?P<step>\d+)")


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe model or project name, else raise ``ValueError`` naming ``what``."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or value.startswith("."):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 characters of [A-Za-z0-9._-], not starting with '.'"
        )
    return value


def inference_name(name: str, step: int) -> str:
    """The served name of ``name``'s checkpoint ``step``: ``name@step``."""
    return f"{name}@{step}"


def parse_inference_name(value: str | None) -> tuple[str, int] | None:
    """Split ``name@step`` into ``(name, step)``; ``None`` if it is not of that form."""
    match = _INFERENCE_NAME_RE.fullmatch(value or "")
    if match is None:
        return None
    return match["name"], int(match["step"])
