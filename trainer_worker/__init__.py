"""trainq's trainer worker: the Celery shell (``app``), the job runner (``jobs``), liveness, metrics, and the core."""

__all__: list[str] = []
