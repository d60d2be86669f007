"""trainq's exceptions. Foreign errors (redis, celery) are translated at the boundary.

    TrainqError
    ├── BackendUnavailableError   Redis or the broker cannot be reached; retryable
    ├── PayloadTooLargeError      a job's groups exceed the configured size; nothing was queued
    ├── TrainTimeoutError         waiting for a job ran past ``timeout``; the job goes on
    ├── TrainerGroupError         (worker side) a training group's rank died or timed out; retryable
    └── JobError                  about one job (``.job_id``)
        ├── JobNotFoundError      no record of that job id (never submitted, or expired)
        ├── JobCancelledError     cancelled while queued; it never ran
        └── JobFailedError        the worker rejected or failed the job (``.error_type``)

Invalid arguments (names, groups, settings) raise ``ValueError``, unknown
keyword arguments ``TypeError``, both before any I/O.
"""

from __future__ import annotations


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
