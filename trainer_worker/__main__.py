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

__all__ = ["main", "resolve_in_subprocess"]


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


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(TrainerSettings, argv, prog="python -m trainer_worker")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # OpenMP threads that spin while waiting take the CPUs from the ones working
    # whenever anything else runs beside the trainer (vLLM, rollouts, the embedded
    # stack); a step on a busy 2-CPU box ran up to 10x slower (bench/bench_trainer.py).
    # Read when torch loads, in the training child.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
