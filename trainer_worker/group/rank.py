"""One rank of the training group: ``python -m trainer_worker.group.rank --spec JSON``, started by torchrun.

Rank 0, the leader, connects to the Celery child's socket, says hello once its
model is loaded, and then serves calls one at a time on its ``Trainer``: it
alone reads and writes the checkpoint folder and checks each job. A job that
needs the other ranks (a registration, a train step) is broadcast to them as
an ``Order`` when its collectives begin (``World.begin``); each follower runs
``Trainer.follow`` on it, so every rank runs the same collectives in the same
order.

While no job's collectives run, the leader broadcasts a heartbeat every
``heartbeat_s``: followers wait for orders in a collective that would
otherwise time out, and a rank that died while idle is noticed then.

A rank that fails in the middle of a job's collectives cannot rejoin the
others where they are: it ends its process. torchrun then stops every rank and
exits, and the Celery child starts the group again and retries the job. The
one error every rank raises at the same point is ``FloatingPointError`` (the
gradient norm is the same on every rank): after it the group goes on.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import msgspec

from producer.types import TrainConfig
from trainer_worker.core.world import Phase
from trainer_worker.group.launch import build_trainer, watch_parent
from trainer_worker.group.protocol import (
    FenceAnswer,
    FenceRefused,
    GroupCall,
    GroupHello,
    GroupReply,
    GroupSpec,
    Order,
    recv_frame,
    send_frame,
)

if TYPE_CHECKING:
    import torch.distributed as dist

    from trainer_worker.core.fsdp import FSDPWorld
    from trainer_worker.core.trainer import Trainer

__all__ = ["AGREED_ERRORS", "Leader", "broadcast_bytes", "check_same_spec", "follow", "main"]

log = logging.getLogger("trainer_worker.group")

AGREED_ERRORS = (FloatingPointError,)
"""Raised by every rank at the same point of a job: the ranks are still in step after one."""

_order_decoder = msgspec.msgpack.Decoder(Order)
_call_decoder = msgspec.msgpack.Decoder(GroupCall)


def broadcast_bytes(data: bytes | None, group: dist.ProcessGroup) -> bytes:
    """The leader's ``data`` on every rank (followers pass ``None``): its length, then its bytes."""
    import torch
    import torch.distributed as dist

    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(length, src=0, group=group)
    if not int(length[0]):
        return b""
    if data is not None:
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=group)
        return data
    buffer = torch.empty(int(length[0]), dtype=torch.uint8)
    dist.broadcast(buffer, src=0, group=group)
    return buffer.numpy().tobytes()


class Leader:
    """Rank 0: serves the Celery child's calls and drives the followers."""

    def __init__(self, trainer: Trainer, world: FSDPWorld, spec: GroupSpec, hosts: list[str]) -> None:
        self.trainer = trainer
        self.world = world
        self.spec = spec
        self.hosts = hosts
        self._call = b""  # the frame of the call being served: what followers get with ``begin``
        # One control broadcast at a time, and none while a job's collectives run: held from
        # ``begin`` to the end of the job's collectives.
        self._control = threading.Lock()
        self._stopped = threading.Event()
        self._conn: socket.socket | None = None  # the Celery child's connection, for fence checks
        world.on_begin = self._begin
        world.on_end = self._control.release

    def serve(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.spec.socket_path)
            self._conn = conn
            hello = GroupHello(world_size=self.world.size, nodes=int(os.environ.get("GROUP_WORLD_SIZE", "1")),
                               hosts=self.hosts)
            send_frame(conn, msgspec.msgpack.encode(hello))
            heartbeat = threading.Thread(target=self._heartbeats, name="trainq-heartbeat", daemon=True)
            heartbeat.start()
            while (raw := recv_frame(conn)) is not None:
                send_frame(conn, msgspec.msgpack.encode(self._serve_one(raw)))
        log.info("the Celery child closed its connection; stopping the group")
        self._stopped.set()
        with self._control:
            self._broadcast(Order(kind="stop"))

    def _serve_one(self, raw: bytes) -> GroupReply:
        self._call = raw
        self.world.figures = []
        try:
            reply = self._run(_call_decoder.decode(raw))
        except Exception as exc:  # noqa: BLE001 - every error goes back to the child, typed
            if self.world.phase_open:
                if not isinstance(exc, AGREED_ERRORS):
                    _abandon(f"the leader failed in a job's collectives: {type(exc).__name__}: {exc}", exc)
                self.world.end_after_agreed_error()
            log.info("call failed: %s: %s", type(exc).__name__, exc)
            return GroupReply(error_type=type(exc).__name__, error=str(exc))
        return msgspec.structs.replace(reply, ranks=self.world.figures)

    def _run(self, call: GroupCall) -> GroupReply:
        from trainer_worker.core.checkpoints import Writer
        from trainer_worker.jobs import decode_groups

        trainer = self.trainer
        writer = Writer(call.writer_token, call.writer_name, self._ask_fence) if call.fenced else Writer()
        if call.kind == "register":
            return GroupReply(outcome=trainer.register(call.model, writer=writer))
        if call.kind == "train":
            if call.config is None:
                raise ValueError("a train call needs a config")
            groups = decode_groups(call.payload)
            outcome = trainer.train(call.job_id, call.model, call.config, groups, base_step=call.base_step,
                                    writer=writer)
            return GroupReply(outcome=outcome)
        if call.kind == "delete_checkpoints":
            return GroupReply(deleted=trainer.delete_checkpoints(call.model, call.keep_steps, latest=call.latest,
                                                                 writer=writer))
        if call.kind == "outcome_of":
            if call.step is None:
                raise ValueError("an outcome_of call needs a step")
            return GroupReply(outcome=trainer.outcome_of(call.model, call.step))
        if call.kind == "forget":
            trainer.forget()
            return GroupReply()
        return GroupReply(latest=trainer.latest_step(call.model))

    def _ask_fence(self) -> None:
        """Ask the Celery child whether this job may still write; ``FenceRefused`` if not."""
        assert self._conn is not None
        send_frame(self._conn, msgspec.msgpack.encode(GroupReply(fence=True)))
        raw = recv_frame(self._conn)
        if raw is None:
            raise FenceRefused("the Celery child went away before answering a fence check")
        if not msgspec.msgpack.decode(raw, type=FenceAnswer).allowed:
            raise FenceRefused("the Celery child refused the write: another worker leads the queue, or another "
                               "delivery took the job over")

    def _begin(self, phase: Phase) -> None:
        self._control.acquire()
        self._broadcast(Order(kind="job", call=self._call, phase=phase))

    def _heartbeats(self) -> None:
        while not self._stopped.wait(self.spec.heartbeat_s):
            with self._control:
                if self._stopped.is_set():
                    return
                try:
                    self._broadcast(Order(kind="heartbeat"))
                except Exception as exc:  # noqa: BLE001 - a rank is gone: the group ends
                    _abandon(f"heartbeat failed, a rank is gone: {exc}", exc)

    def _broadcast(self, order: Order) -> None:
        broadcast_bytes(msgspec.msgpack.encode(order), self.world.control)


def follow(trainer: Trainer, world: FSDPWorld) -> None:
    """A follower's loop: each order's part of its job, until the leader says stop."""
    from trainer_worker.jobs import decode_groups

    while True:
        order = _order_decoder.decode(broadcast_bytes(None, world.control))
        if order.kind == "stop":
            return
        if order.kind == "heartbeat":
            continue
        if order.phase is None:
            _abandon("a job order without a phase")
        call = _call_decoder.decode(order.call)
        config: TrainConfig | None = call.config if call.kind == "train" else None
        try:
            groups = decode_groups(call.payload) if call.kind == "train" else None
            trainer.follow(order.phase, config, groups)
        except AGREED_ERRORS as exc:
            log.info("job failed on every rank: %s: %s", type(exc).__name__, exc)
            world.end_after_agreed_error()
        except Exception as exc:  # noqa: BLE001
            _abandon(f"failed in a job's collectives: {type(exc).__name__}: {exc}", exc)


def _abandon(reason: str, exc: BaseException | None = None) -> NoReturn:
    """Leave the group at once: the other ranks' collectives fail, torchrun stops them all."""
    log.critical("rank %s: %s; leaving the group", os.environ.get("RANK", "?"), reason, exc_info=exc)
    logging.shutdown()
    os._exit(1)


def check_same_spec(spec: GroupSpec, world: FSDPWorld) -> None:
    """Every rank must train the same way; a node started with other settings is refused by name."""
    leader = broadcast_bytes(msgspec.json.encode(spec.shared()) if world.is_leader else None, world.control)
    theirs = msgspec.json.decode(leader, type=GroupSpec)
    mine = spec.shared()
    differ = [f for f in mine.__struct_fields__ if getattr(mine, f) != getattr(theirs, f)]
    if differ:
        values = ", ".join(f"{f}={getattr(mine, f)!r} (leader: {getattr(theirs, f)!r})" for f in differ)
        raise SystemExit(f"rank {world.rank}: settings differ from the leader's: {values}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer_worker.group.rank", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="the GroupSpec, msgspec JSON")
    args = parser.parse_args(argv)
    spec = msgspec.json.decode(args.spec, type=GroupSpec)
    watch_parent()
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")

    import torch.distributed as dist

    from trainer_worker.core.fsdp import setup_world

    world = setup_world(spec.device, spec.collective_timeout_s)
    check_same_spec(spec, world)
    trainer = build_trainer(spec, world)
    hosts: list[str | None] = [None] * world.size
    dist.all_gather_object(hosts, socket.gethostname(), group=world.control)
    log.info("rank %d of %d ready on %s", world.rank, world.size, world.device)
    if world.is_leader:
        Leader(trainer, world, spec, [str(h) for h in hosts]).serve()
    else:
        follow(trainer, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
