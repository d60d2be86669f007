"""ART's ``art.local.backend``."""

from producer.local_backend import LocalBackend

__all__ = ["LocalBackend"]
