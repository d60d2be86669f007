"""Starting a training group: torchrun's command line, a torchrun that dies with its parent, other nodes' loop.

``python -m trainer_worker.group.launch TORCHRUN-ARGS`` is torchrun
(``torch.distributed.run``) that also ends when the process that started it
is gone: a Celery child that is killed must not leave its group training.
torchrun starts each rank in a session of its own, so the ranks watch their
parent, torchrun, the same way.

Node 0 runs the Celery worker, whose training child starts torchrun for the
group's ranks on that node (``client.GroupTrainer``). Every other node runs
``python -m trainer_worker ... --nnodes K --node-rank R --rdzv-endpoint H:P``,
which runs no Celery worker: ``run_member`` starts torchrun for its ranks and
starts it again whenever the group ends (a rank failed, or node 0 restarted
the group), so the node joins the next group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from trainer_worker.group.protocol import GroupSpec
from trainer_worker.settings import TrainerSettings

if TYPE_CHECKING:
    from trainer_worker.core.trainer import Trainer
    from trainer_worker.core.world import World

__all__ = ["build_trainer", "group_spec", "run_member", "torchrun_command", "watch_parent"]

log = logging.getLogger(__name__)

REJOIN_DELAY_S = 5.0
_PARENT_POLL_S = 0.5


def watch_parent() -> None:
    """End this process (SIGTERM to itself) soon after its parent process is gone.

    Not ``PR_SET_PDEATHSIG``: that fires when the parent's *thread* that
    started this process ends, and a Celery child starts its group from a
    thread that does not live as long as the child.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="trainq-watch-parent", daemon=True).start()


def group_spec(s: TrainerSettings, base_model_path: str, socket_path: str = "") -> GroupSpec:
    """The trainer's ``GroupSpec`` (every rank's, or the one in-process trainer's) from the worker's settings."""
    return GroupSpec(
        base_model=s.base_model,
        base_model_path=base_model_path,
        checkpoint_root=s.checkpoint_root,
        device=s.device,
        dtype=s.dtype,
        max_tokens_per_microbatch=s.max_tokens_per_microbatch,
        seed=s.seed,
        collective_timeout_s=s.collective_timeout_s,
        # Followers wait for orders in a collective: heartbeats keep that wait well inside its timeout.
        heartbeat_s=min(30.0, s.collective_timeout_s / 10),
        socket_path=socket_path,
    )


def build_trainer(spec: GroupSpec, world: World | None = None) -> Trainer:
    """The ``Trainer`` a spec describes: in this process (no ``world``), or as one rank of a group."""
    from trainer_worker.core.trainer import Trainer

    return Trainer(
        spec.base_model_path,
        spec.checkpoint_root,
        device=spec.device,
        max_tokens_per_microbatch=spec.max_tokens_per_microbatch,
        seed=spec.seed,
        dtype=spec.dtype,
        world=world,
    )


def torchrun_command(spec: GroupSpec, *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str = "") -> list[str]:
    """The command that starts this node's ranks.

    One node without an endpoint: a rendezvous on a free local port (torchrun's
    ``--standalone``). Otherwise the static rendezvous at ``rdzv_endpoint``,
    hosted by node 0, where ranks follow node ranks: node 0's first rank is
    rank 0, the leader. No torchrun restarts: a failed group is started again
    whole, by the Celery child on node 0 and by ``run_member`` elsewhere.
    """
    args = [sys.executable, "-m", "trainer_worker.group.launch",
            f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", "--max-restarts=0"]
    if nnodes == 1 and not rdzv_endpoint:
        args += ["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", f"--rdzv-id={uuid.uuid4().hex}"]
    else:
        args += ["--rdzv-backend=static", f"--rdzv-endpoint={rdzv_endpoint}", f"--node-rank={node_rank}"]
    return [*args, "-m", "trainer_worker.group.rank", "--spec", msgspec.json.encode(spec).decode()]


def run_member(settings: TrainerSettings, base_model_path: str) -> None:
    """A node other than node 0: its ranks, joined to each group node 0 starts, until SIGTERM."""
    spec = group_spec(settings, base_model_path)
    command = torchrun_command(
        spec,
        nproc_per_node=settings.nproc_per_node,
        nnodes=settings.nnodes,
        node_rank=settings.node_rank,
        rdzv_endpoint=settings.rdzv_endpoint,
    )
    stopping = threading.Event()
    current: list[subprocess.Popen] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.set()
        for proc in current:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping.is_set():
        current[:] = [subprocess.Popen(command)]
        code = current[0].wait()
        if stopping.is_set():
            break
        log.warning("this node's ranks left the group (exit %s); joining the next one in %.0f s", code, REJOIN_DELAY_S)
        stopping.wait(REJOIN_DELAY_S)


def main(argv: Sequence[str] | None = None) -> None:
    """torchrun, ended when its parent is."""
    watch_parent()
    from torch.distributed.run import main as torchrun

    torchrun(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
