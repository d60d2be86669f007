"""ART's ``art.local``: the backend that runs everything on this machine."""

from producer.local_backend import LocalBackend

__all__ = ["LocalBackend"]
