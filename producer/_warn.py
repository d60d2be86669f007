"""One warning per message per process: for settings trainq accepts and ignores."""

from __future__ import annotations

import warnings

__all__ = ["warn_once"]

_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """``UserWarning(message)`` the first time this message is warned of in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
