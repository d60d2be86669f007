"""The records between the Celery child and its training group, and how they travel.

    Celery child (GroupTrainer)  --GroupCall-->   leader rank (rank 0)   --Order-->   follower ranks
                                 <--GroupReply--

The child and the leader talk over a Unix socket the child listens on: one
frame per record, an 8-byte big-endian length and the msgpack. The leader
passes each job on to its followers as an ``Order`` broadcast on the group's
gloo control group (``rank.broadcast_bytes``). Nothing here imports torch.
"""

from __future__ import annotations

import socket
import struct
from typing import Literal

import msgspec

from producer.types import JobOutcome, ModelRef, TrainConfig
from trainer_worker.core.world import Phase, RankStats

__all__ = [
    "FenceAnswer",
    "FenceRefused",
    "GroupCall",
    "GroupHello",
    "GroupReply",
    "GroupSpec",
    "Order",
    "recv_frame",
    "send_frame",
]

_LENGTH = struct.Struct(">Q")
MAX_FRAME_BYTES = 1 << 34  # 16 GiB: far beyond any payload limit, short of a corrupt length


class GroupSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What every rank needs to build its trainer (msgspec JSON on the rank's command line)."""

    base_model: str
    """The name jobs carry (``--base-model``); every node must serve the same."""
    base_model_path: str
    """Where this node's copy of the model is (resolved on each node)."""
    checkpoint_root: str
    device: Literal["cpu", "cuda"]
    dtype: str
    max_tokens_per_microbatch: int
    seed: int
    collective_timeout_s: float
    heartbeat_s: float
    socket_path: str = ""
    """The Celery child's socket; the leader connects to it. Empty on other nodes."""

    def shared(self) -> GroupSpec:
        """The fields every rank must agree on (each node has its own paths)."""
        return msgspec.structs.replace(self, base_model_path="", checkpoint_root="", socket_path="")


class GroupCall(msgspec.Struct, frozen=True, kw_only=True):
    """One call of the Trainer's interface, from the Celery child to the leader.

    ``base_step``, ``latest`` and ``step`` are ``Trainer.train``'s, ``delete_checkpoints``' and
    ``outcome_of``'s arguments; ``writer_token`` and ``writer_name`` the step writer's
    (``checkpoints.Writer``). With ``fenced``, the leader asks the child before it renames a
    step into place or deletes steps (a ``GroupReply`` with ``fence``): the fence is the
    child's, which holds the queue's Redis and the job's claim.
    """

    kind: Literal["register", "train", "delete_checkpoints", "latest_step", "outcome_of", "forget"]
    model: ModelRef
    job_id: str = ""
    config: TrainConfig | None = None
    keep_steps: list[int] = msgspec.field(default_factory=list)
    payload: bytes = b""
    """A train job's groups: ``producer.validation.encode_groups``'s msgpack."""
    base_step: int | None = None
    latest: int | None = None
    step: int | None = None
    writer_token: int = 0
    writer_name: str = ""
    fenced: bool = False


class GroupReply(msgspec.Struct, frozen=True, kw_only=True):
    """The leader's answer to one ``GroupCall``: a result, or the error the call raised.

    A reply with ``fence`` is not the answer: the leader asks whether it may still write
    and waits for a ``FenceAnswer``; the answer follows.
    """

    outcome: JobOutcome | None = None
    latest: int | None = None
    deleted: list[int] = msgspec.field(default_factory=list)
    error_type: str = ""
    error: str = ""
    ranks: list[RankStats] = msgspec.field(default_factory=list)
    fence: bool = False


class FenceAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The Celery child's answer to a fence check: may the leader still write this job's step?"""

    allowed: bool


class FenceRefused(RuntimeError):
    """The Celery child refused a write: another worker leads the queue, or another delivery took the job."""


class GroupHello(msgspec.Struct, frozen=True, kw_only=True):
    """The leader's first frame: the group is up and its model loaded."""

    world_size: int
    nodes: int
    """torchrun agents (machines) in the group."""
    hosts: list[str]
    """Each rank's host name, by rank."""


class Order(msgspec.Struct, frozen=True, kw_only=True):
    """What the leader broadcasts to its followers."""

    kind: Literal["heartbeat", "job", "stop"]
    call: bytes = b""
    """A job: the ``GroupCall`` frame as the child sent it."""
    phase: Phase | None = None


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(data)))
    sock.sendall(data)


def recv_frame(sock: socket.socket) -> bytes | None:
    """The next frame; ``None`` if the peer closed the connection between frames."""
    try:
        (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    except EOFError:
        return None
    if length > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {length} bytes announced: not a trainq peer")
    try:
        return _recv_exactly(sock, length)
    except EOFError:
        raise ConnectionError(f"connection closed before a {length}-byte frame arrived") from None


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes; ``EOFError`` if the peer closed before the first, ``ConnectionError`` after it."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                raise EOFError
            raise ConnectionError(f"connection closed {got} bytes into a {size}-byte read")
        got += n
    return bytes(buffer)
