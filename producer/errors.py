"""trainq's exceptions. Foreign errors (redis, celery) are translated at the boundary.

    TrainqError
    ├── BackendUnavailableError   Redis or the broker cannot be reached; retryable
    ├── PayloadTooLargeError      a job's groups exceed the configured size; nothing was queued
    ├── TrainTimeoutError         waiting for a job ran past ``timeout``; the job goes on
    ├── NoWorkerError             no live trainer worker serves the model's queue; names the live ones
    ├── TrainerGroupError         (worker side) a training group's rank died or timed out; retryable
    └── JobError                  about one job (``.job_id``)
        ├── JobNotFoundError      no record of that job id (never submitted, or expired)
        ├── JobCancelledError     cancelled while queued; it never ran
        └── JobFailedError        the worker rejected or failed the job (``.error_type``)

Invalid arguments (names, groups, settings) raise ``ValueError``, unknown
keyword arguments ``TypeError``, both before any I/O.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobNotFoundError",
    "NoWorkerError",
    "PayloadTooLargeError",
    "TrainTimeoutError",
    "TrainerGroupError",
    "TrainqError",
]


class TrainqError(Exception):
    """Base of every error trainq raises on purpose."""


class BackendUnavailableError(TrainqError, ConnectionError):
    """Redis or the broker is unreachable. The job may or may not have been queued: check ``job_id``."""


class PayloadTooLargeError(TrainqError, ValueError):
    """The encoded groups are larger than ``max_payload_bytes``; nothing was queued."""


class TrainTimeoutError(TrainqError, TimeoutError):
    """Waiting for a job ran past its timeout. The job itself is not cancelled."""

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"job {job_id} did not finish within {timeout:g} s (it keeps running)")
        self.job_id = job_id


class NoWorkerError(TrainqError):
    """No live trainer worker serves a queue; the message names the queue and the workers that are live.

    Usually the model's ``base_model`` differs from the worker's ``--base-model`` (a hub id on
    one side, a local folder on the other). A job already queued stays queued.
    """

    def __init__(self, queue: str, live: list[str], *, waited_s: float, base_model: str | None = None) -> None:
        serving = "; ".join(live) if live else "none"
        wanted = f" (base model {base_model!r})" if base_model else ""
        fix = f"start one with --base-model {base_model!r}, or " if base_model else "start one, or "
        super().__init__(
            f"no live trainer worker has served queue {queue}{wanted} for {waited_s:.0f} s; live workers: "
            f"{serving}. {fix[0].upper()}{fix[1:]}give the model the base_model string a live worker serves"
        )
        self.queue = queue


class TrainerGroupError(TrainqError):
    """A trainer worker's training group failed mid-call (a rank died, a collective timed out).

    Nothing of the call was written; the worker has started the group again (or
    will on its next call) and retries the job. A job's record names this error
    only when every retry failed.
    """


class JobError(TrainqError):
    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFoundError(JobError, LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"no job {job_id!r} (never submitted, or its record expired)")


class JobCancelledError(JobError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id} was cancelled before it ran")


class JobFailedError(JobError):
    """The worker ran or rejected the job and recorded an error."""

    def __init__(self, job_id: str, error_type: str, message: str) -> None:
        super().__init__(job_id, f"job {job_id} failed: {error_type}: {message}")
        self.error_type = error_type
        self.error_message = message
