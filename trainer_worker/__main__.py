"""``python -m trainer_worker``: one trainer worker for one base model."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence

from producer import keys
from producer.settings import parse_settings
from trainer_worker.settings import TrainerSettings

__all__ = ["OPENMP_WAIT_ENV", "main", "resolve_in_subprocess", "set_openmp_wait"]


def resolve_in_subprocess(base_model: str) -> str:
    """Resolve (and materialise, once) the base model in a child process.

    The Celery parent forks the training child; loading torch here first would
    fork its thread pools and allocator into it. A short-lived child keeps the
    parent free of torch.
    """
    done = subprocess.run(
        [sys.executable, "-m", "producer.base_models", base_model],
        stdout=subprocess.PIPE, text=True, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"trainer_worker: cannot resolve --base-model {base_model!r} (see the error above)")
    return done.stdout.strip().splitlines()[-1]


# The environment a training process starts with, per TrainerSettings.openmp_wait: libgomp reads it once, when
# torch loads in the training child (or torchrun's ranks, which inherit it).
OPENMP_WAIT_ENV = {"spin": {"GOMP_SPINCOUNT": "10000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def set_openmp_wait(wait: str) -> None:
    """Set the OpenMP wait the settings ask for, unless the environment already says how OpenMP threads wait."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ.update(OPENMP_WAIT_ENV[wait])


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(TrainerSettings, argv, prog="python -m trainer_worker")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_openmp_wait(settings.openmp_wait)
    if settings.node_rank > 0:
        from trainer_worker.group.launch import run_member

        # Another machine of node 0's training group: its ranks only, no Celery worker.
        run_member(settings, resolve_in_subprocess(settings.base_model))
        return
    from trainer_worker.app import create_app

    app, state = create_app(settings, resolve_in_subprocess(settings.base_model))
    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            "--pool=prefork",
            "--concurrency=1",
            # Every worker starts as a standby; the one that wins the queue's lease adds the queue (liveness.py).
            f"--queues={keys.IDLE_QUEUE}",
            f"--hostname={state.hostname}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


if __name__ == "__main__":
    main()
