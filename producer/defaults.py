"""Defaults that several modules, or both sides of the queue, must agree on: each defined once, here."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "DEFAULT_PATH"]

DEFAULT_PATH = ".trainq"
"""The SDK's folder: model logs (``model.log``) and the local stack's state, logs and checkpoints."""

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
"""Largest encoded groups payload of one train job: producers refuse to queue more, workers to read more."""
