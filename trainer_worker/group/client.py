"""``GroupTrainer``: the Celery child's trainer when the model trains on a torchrun group.

It offers what ``JobRunner`` uses of ``Trainer`` (``register``, ``train``,
``delete_checkpoints``, ``outcome_of``, ``forget``, ``latest_step``) and
forwards each call to the group's leader rank over a Unix socket
(``protocol``). The leader writes the steps, but the fence that may stop a
write (``checkpoints.Writer``) is this process's: it holds the queue's Redis
and the job's claim, so the leader asks it before each rename or deletion. The child listens; torchrun is
a subprocess of the child (a daemonic prefork child may not ``fork`` a
``multiprocessing`` pool, but it may start a program), and its leader rank
connects once its model is loaded.

A group that fails during a call (a rank died, a collective timed out, torchrun
exited) is stopped whole and started again before ``TrainerGroupError`` is
raised: nothing of the call was written, unless the leader finished writing the
step before the group fell, and then the retried job finds that step
(``Trainer.train``'s exactly-once check). A group found down between calls is
started again before the next call is sent.
"""

from __future__ import annotations

import builtins
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import msgspec

from producer.errors import TrainerGroupError
from producer.types import JobOutcome, ModelRef, TrainConfig, TrajectoryGroup
from producer.validation import encode_groups
from trainer_worker import metrics
from trainer_worker.core.checkpoints import UNFENCED, Writer
from trainer_worker.core.world import RankStats
from trainer_worker.group.launch import group_spec, torchrun_command
from trainer_worker.group.protocol import (
    FenceAnswer,
    GroupCall,
    GroupHello,
    GroupReply,
    recv_frame,
    send_frame,
)
from trainer_worker.settings import TrainerSettings

__all__ = ["GroupTrainer"]

log = logging.getLogger(__name__)

_STOP_GRACE_S = 30.0
_POLL_S = 1.0


class _GroupGone(Exception):
    """The group stopped answering: its leader's connection closed, or torchrun exited."""


class GroupTrainer:
    """The ``Trainer`` interface, served by a torchrun group (see the module docstring).

    Args:
        settings: the worker's; ``nproc_per_node``, ``nnodes``, ``node_rank`` (0) and
            ``rdzv_endpoint`` shape the group, the rest every rank's trainer.
        base_model_path: the resolved base model on this machine.
        start_timeout_s: how long a start may take, the ranks' model loading included.
    """

    def __init__(self, settings: TrainerSettings, base_model_path: str, *, start_timeout_s: float = 900.0) -> None:
        if settings.node_rank != 0:
            raise ValueError("only node 0 runs the Celery worker and the group's leader")
        self.start_timeout_s = start_timeout_s
        self.checkpoint_root = Path(settings.checkpoint_root)
        """Where the leader writes the steps: on this machine (node 0), as the job runner reads them."""
        self.restarts = 0
        self.hello: GroupHello | None = None
        self.last_ranks: list[RankStats] = []
        """Each rank's figures for the last call that ran collectives."""
        self._folder = tempfile.mkdtemp(prefix="trainq-group-")
        path = os.path.join(self._folder, "leader.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        spec = group_spec(settings, base_model_path, socket_path=path)
        self._command = torchrun_command(spec, nproc_per_node=settings.nproc_per_node, nnodes=settings.nnodes,
                                         node_rank=0, rdzv_endpoint=settings.rdzv_endpoint)
        self._proc: subprocess.Popen | None = None
        self._conn: socket.socket | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ the interface

    @property
    def world_size(self) -> int:
        return self.hello.world_size if self.hello else 0

    @property
    def nodes(self) -> int:
        return self.hello.nodes if self.hello else 0

    def register(self, model: ModelRef, *, writer: Writer = UNFENCED) -> JobOutcome:
        return self._outcome(self._call(_with_writer(GroupCall(kind="register", model=model), writer), writer))

    def train(
        self, job_id: str, model: ModelRef, config: TrainConfig, groups: list[TrajectoryGroup], *,
        base_step: int | None = None, writer: Writer = UNFENCED,
    ) -> JobOutcome:
        payload = encode_groups(groups, allow_missing_logprobs=config.allow_training_without_logprobs)
        call = GroupCall(kind="train", model=model, job_id=job_id, config=config, payload=payload, base_step=base_step)
        return self._outcome(self._call(_with_writer(call, writer), writer))

    def delete_checkpoints(
        self, model: ModelRef, keep_steps: list[int], *, latest: int | None = None, writer: Writer = UNFENCED,
    ) -> list[int]:
        call = GroupCall(kind="delete_checkpoints", model=model, keep_steps=keep_steps, latest=latest)
        return self._call(_with_writer(call, writer), writer).deleted

    def outcome_of(self, model: ModelRef, step: int) -> JobOutcome:
        return self._outcome(self._call(GroupCall(kind="outcome_of", model=model, step=step)))

    def forget(self) -> None:
        """The leader reloads from disk before its next job; a group that is down reloads anyway."""
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            self._call(GroupCall(kind="forget", model=_NO_MODEL))

    def latest_step(self, model: ModelRef) -> int | None:
        return self._call(GroupCall(kind="latest_step", model=model)).latest

    def close(self) -> None:
        """Stop the group (its leader stops the others when the connection closes) and clean up."""
        self._stop_group()
        self._listener.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    # ------------------------------------------------------------ the group

    def _call(self, call: GroupCall, writer: Writer = UNFENCED) -> GroupReply:
        if self._conn is None or self._proc is None or self._proc.poll() is not None:
            self._restart("the group had stopped since the last call")
        conn, proc = self._conn, self._proc
        assert conn is not None and proc is not None  # _restart started the group or raised
        refused: Exception | None = None
        try:
            send_frame(conn, msgspec.msgpack.encode(call))
            while (reply := msgspec.msgpack.decode(_await_reply(conn, proc), type=GroupReply)).fence:
                refused = _fence(writer)
                send_frame(conn, msgspec.msgpack.encode(FenceAnswer(allowed=refused is None)))
        except (OSError, _GroupGone) as exc:
            log.error("the training group failed during %s %s: %s", call.kind, call.job_id, exc)
            self._restart(str(exc))
            raise TrainerGroupError(
                f"the training group failed during {call.kind} ({exc}); it was started again"
            ) from exc
        self._observe(reply)
        if refused is not None and reply.error_type == "FenceRefused":
            raise refused  # the fence's own error: the job runner hands the job back
        if reply.error_type:
            raise _rebuilt(reply.error_type, reply.error)
        return reply

    def _start(self) -> None:
        started = time.monotonic()
        # A session of its own: the worker's terminal signals do not reach torchrun past the child.
        self._proc = subprocess.Popen(self._command, start_new_session=True)
        self._listener.settimeout(_POLL_S)
        while True:
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                if self._proc.poll() is not None:
                    raise TrainerGroupError(
                        f"the training group exited with {self._proc.returncode} before its leader was up "
                        "(see the ranks' log above)"
                    ) from None
                if time.monotonic() - started > self.start_timeout_s:
                    self._stop_group(graceful=False)
                    raise TrainerGroupError(f"the training group was not up after {self.start_timeout_s:g} s") from None
        conn.settimeout(None)
        raw = recv_frame(conn)
        if raw is None:
            conn.close()
            raise TrainerGroupError("the leader rank closed its connection before saying hello")
        self._conn = conn
        self.hello = msgspec.msgpack.decode(raw, type=GroupHello)
        metrics.GROUP_RANKS.set(self.hello.world_size)
        metrics.GROUP_NODES.set(self.hello.nodes)
        log.info("training group up: %d ranks on %d node(s) in %.1f s", self.hello.world_size, self.hello.nodes,
                 time.monotonic() - started)

    def _restart(self, reason: str) -> None:
        log.warning("starting the training group again: %s", reason)
        self._stop_group(graceful=False)
        self.restarts += 1
        metrics.GROUP_RESTARTS.inc()
        self._start()

    def _stop_group(self, *, graceful: bool = True) -> None:
        """Stop torchrun and its ranks; ``graceful``: first let the leader stop them (it does when its
        connection closes between calls), as a failed group may not be listening."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if graceful:
            try:
                proc.wait(_STOP_GRACE_S)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.send_signal(signal.SIGTERM)  # torchrun stops its ranks
        try:
            proc.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # the ranks see their parent go and end themselves
            proc.wait()

    def _observe(self, reply: GroupReply) -> None:
        if reply.ranks:
            self.last_ranks = reply.ranks
        for rank in reply.ranks:
            label = str(rank.rank)
            if rank.step_s > 0:
                metrics.RANK_TOKENS_PER_S.labels(label).set(rank.tokens / rank.step_s)
            metrics.COLLECTIVE_SECONDS.labels(label).inc(rank.collective_s)

    @staticmethod
    def _outcome(reply: GroupReply) -> JobOutcome:
        if reply.outcome is None:
            raise TrainerGroupError("the leader rank answered without an outcome")
        return reply.outcome


_NO_MODEL = ModelRef(project="-", name="-", base_model="-")  # for calls about no model


def _with_writer(call: GroupCall, writer: Writer) -> GroupCall:
    return msgspec.structs.replace(call, writer_token=writer.token, writer_name=writer.name,
                                   fenced=writer is not UNFENCED)


def _fence(writer: Writer) -> Exception | None:
    """Run ``writer``'s fence here; the error that refuses the write, or ``None`` to allow it."""
    try:
        writer.fence()
    except Exception as exc:  # noqa: BLE001 - whatever refuses the write is raised again in _call
        return exc
    return None


def _await_reply(conn: socket.socket, proc: subprocess.Popen) -> bytes:
    while True:
        readable, _, _ = select.select([conn], [], [], _POLL_S)
        if readable:
            raw = recv_frame(conn)
            if raw is None:
                raise _GroupGone("the leader rank closed its connection")
            return raw
        if proc.poll() is not None:
            raise _GroupGone(f"torchrun exited with {proc.returncode}")


def _rebuilt(error_type: str, message: str) -> Exception:
    """The leader's error as the same built-in type (``ValueError`` stays a rejected job); others as RuntimeError."""
    kind = getattr(builtins, error_type, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(message)
    return RuntimeError(f"{error_type}: {message}")
