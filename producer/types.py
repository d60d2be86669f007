"""The wire contract: every record that crosses a process boundary.

All three packages import this module; it imports only msgspec. Records evolve
by msgspec's schema-evolution rules: a new field gets a default and goes last,
no field is ever reordered or renamed, and a field's type only ever widens, so
that readers accept what older writers sent. Nothing here is ever pickled.

A train job's groups are encoded by ``encode_groups`` (the one place that
writes them) and decoded by a plain ``msgspec.msgpack.Decoder(list[TrajectoryGroup])``.
"""

from __future__ import annotations

import array
import copy
import enum
import math
import re
import struct
import sys
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

__all__ = [
    "CheckpointEvent",
    "Choice",
    "ChoiceMessage",
    "ExceptionInfo",
    "JobStatus",
    "LocalTrainResult",
    "ModelRef",
    "QueueTrainResult",
    "TrainConfig",
    "TrainRequest",
    "TrainResult",
    "Trajectory",
    "TrajectoryGroup",
    "encode_groups",
    "validate_groups",
    "validate_name",
]

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_INFERENCE_NAME_RE = re.compile(r"(?P<name>[A-Za-z0-9._-]{1,64})@(?P<step>\d+)")


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe model or project name, else raise ``ValueError``.

    Names become folder names under the checkpoint root and Redis key parts, so
    they are 1-64 of ``[A-Za-z0-9._-]`` and may not start with ``.`` (which
    rules out ``.`` and ``..``).
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or value.startswith("."):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 characters of [A-Za-z0-9._-], not starting with '.'"
        )
    return value


def parse_inference_name(inference_name: str) -> tuple[str, int] | None:
    """Split ``name@step`` into ``(name, step)``; ``None`` if it is not of that form."""
    match = _INFERENCE_NAME_RE.fullmatch(inference_name or "")
    if match is None:
        return None
    return match["name"], int(match["step"])


# --------------------------------------------------------------------------- data

# The records a payload holds by the thousand are not tracked by Python's cycle
# collector (``gc=False``): decoding a 1 MB job took ~1.2 ms (15%) less on the
# worker (bench/bench_queue.py's payload). They are plain data: a reference
# cycle through one of them (a trajectory stored in its own ``metadata``) would
# never be collected.


class ChoiceMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The assistant message a sampler produced (OpenAI shape)."""

    content: str | None = None
    role: str = "assistant"
    tool_calls: list[dict[str, Any]] | None = None


class Choice(msgspec.Struct, kw_only=True, array_like=True, tag="choice", gc=False):
    """One sampled assistant turn, exactly as the sampler produced it.

    Invariant: ``len(token_ids) == len(logprobs)``; ``logprobs[i]`` is the
    sampler's log-probability of ``token_ids[i]``. The trainer uses these token
    ids verbatim and never re-tokenizes ``message``.

    Encoded as a tagged array so that it can share a list with plain chat
    message dicts (which encode as maps) in ``Trajectory.messages_and_choices``.

    ``logprobs`` is a sequence of floats. On the wire (``encode_groups``) it
    travels as packed little-endian float32 bytes: vLLM computes logprobs in
    float32 and the trainer uses them as float32, so nothing is lost, and a job
    is ~28% smaller than with msgspec's 9-byte doubles (bench/bench_payload.py).
    Packed bytes, given here or decoded, become an ``array.array("f")``
    (indexing, iteration, ``len``, ``sum`` as a list; ``list(...)`` for a list):
    the worker then takes them to a tensor without making a Python float per
    token. A plain float list (what rollout code builds, and what older
    producers sent) is kept as it is.
    """

    token_ids: list[int]
    logprobs: Sequence[float] | bytes  # a list as given; bytes become an array("f") (see above)
    message: ChoiceMessage = msgspec.field(default_factory=ChoiceMessage)
    finish_reason: str | None = None
    # The step of the adapter that sampled this turn (from ``name@step``), if known.
    sampled_step: int | None = None

    def __post_init__(self) -> None:
        if type(self.logprobs) is bytes:
            self.logprobs = _float32_array(self.logprobs)

    @classmethod
    def from_openai(cls, choice: Any, inference_name: str | None = None) -> Choice:
        """Convert an ``openai`` chat choice sampled with logprobs and token ids.

        ``choice`` is a ``ChatCompletion`` (its first choice is used, and its
        ``model`` gives the sampled step) or one of its ``choices``; pass
        ``inference_name`` (``name@step``) with a bare choice to record the
        step. The request must ask vLLM for ``logprobs=True`` and
        ``extra_body={"return_tokens_as_token_ids": True}``.
        """
        from producer._openai import choice_from_openai  # keeps openai off the import path

        return choice_from_openai(cls, choice, inference_name)


class ExceptionInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A rollout that raised instead of producing a trajectory."""

    type: str
    message: str = ""
    traceback: str = ""


MessageOrChoice = dict[str, Any] | Choice


class Trajectory(msgspec.Struct, array_like=True, gc=False):
    """One rollout: the conversation (chat message dicts and sampled ``Choice`` s) and its reward.

    Encoded as an array (fields by position): a payload holds thousands of
    trajectories, and field names in each would cost bytes and decode time
    (bench/bench_payload.py). New fields therefore go last, with a default.
    """

    messages_and_choices: list[MessageOrChoice]
    reward: float = 0.0
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    logs: list[str] = msgspec.field(default_factory=list)

    def choices(self) -> list[Choice]:
        """The sampled turns, in order."""
        return [item for item in self.messages_and_choices if isinstance(item, Choice)]


class TrajectoryGroup(msgspec.Struct, array_like=True, gc=False):
    """Trajectories of one prompt, compared with each other for advantages.

    Encoded as an array, as ``Trajectory`` is; new fields go last, with a default.

    ``sampled_step`` is the adapter step the group was sampled at; when left
    ``None`` it is derived from the choices' ``sampled_step`` (the oldest one).
    """

    trajectories: list[Trajectory]
    exceptions: list[ExceptionInfo] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    sampled_step: int | None = None

    def effective_sampled_step(self) -> int | None:
        """``sampled_step`` if set, else the oldest step any of its choices was sampled at."""
        if self.sampled_step is not None:
            return self.sampled_step
        steps = [
            c.sampled_step for t in self.trajectories for c in t.choices() if c.sampled_step is not None
        ]
        return min(steps) if steps else None


# ----------------------------------------------------------------------- encoding

_groups_encoder = msgspec.msgpack.Encoder()
_BIG_ENDIAN = sys.byteorder == "big"


def encode_groups(groups: list[TrajectoryGroup], *, allow_missing_logprobs: bool = False) -> bytes:
    """``validate_groups``, then the msgpack of the groups with every choice's logprobs packed as float32.

    One pass: each choice's logprobs are packed once, and their values checked
    on the packed bytes (``_float32_all_negative``). The caller's records are
    left as they are: what the encoder sees are shallow copies holding the
    packed bytes. A logprob beyond float32's range is a ``ValueError`` naming it.
    """
    return _groups_encoder.encode(_checked_groups(groups, allow_missing_logprobs, pack=True))


def _pack_float32(values: list[float] | array.array) -> bytes:
    """``values`` as little-endian IEEE float32 bytes, the wire form of ``Choice.logprobs``."""
    if isinstance(values, array.array) and values.typecode == "f":  # decoded, and sent on again
        return (_swapped(values) if _BIG_ENDIAN else values).tobytes()
    # struct packs a float list ~30% faster than array.array("f", values).
    return struct.pack(f"<{len(values)}f", *values)


def _float32_array(data: bytes) -> array.array:
    """The floats of ``_pack_float32``'s bytes; ``ValueError`` if they are not whole float32s."""
    if len(data) % 4:
        raise ValueError(f"packed float32 logprobs need a multiple of 4 bytes, got {len(data)}")
    values = array.array("f", data)  # a copy of the bytes: no Python float per value
    return _swapped(values) if _BIG_ENDIAN else values


def _swapped(values: array.array) -> array.array:
    swapped = array.array(values.typecode, values)
    swapped.byteswap()
    return swapped


# ------------------------------------------------------------------------- config


ImportanceSamplingLevel = Literal["token", "sequence"]


class TrainConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How one train step is run. Every field is a keyword of ``backend.train``."""

    learning_rate: float = 5e-6
    """AdamW learning rate of the LoRA parameters; > 0."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the base model (adapter disabled); >= 0, 0 skips it."""
    ppo: bool = False
    """PPO clipped surrogate when true; CISPO-style clipped-weight policy gradient otherwise."""
    epsilon: float | None = None
    """Lower clip range; default 0.2 for PPO, unused lower bound for CISPO."""
    epsilon_high: float | None = None
    """Upper clip range; defaults to ``epsilon`` for PPO and 0.28 ... 5.0 for CISPO (see loss)."""
    scale_rewards: bool = True
    """Divide group-relative advantages by the group's reward std (+1e-6)."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """Importance ratio per token, or one per sequence (geometric mean, GSPO-style)."""
    max_staleness: int | None = None
    """Drop groups sampled more than this many steps before the latest; None keeps all."""
    allow_training_without_logprobs: bool = False
    """Accept choices without sampler logprobs, using the trainer's own (ratio 1)."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate", "a finite number > 0", self.learning_rate)
        _check(math.isfinite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0", self.beta)
        for field in ("epsilon", "epsilon_high"):
            value = getattr(self, field)
            _check(value is None or (math.isfinite(value) and value > 0), field, "None or a finite number > 0", value)
        _check(self.max_staleness is None or self.max_staleness >= 0, "max_staleness", "None or an int >= 0", self.max_staleness)


def _check(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


# ------------------------------------------------------------------------ results


class TrainResult(msgspec.Struct, kw_only=True):
    """What a train call returns: the new step and the step's metrics."""

    step: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class LocalTrainResult(TrainResult, kw_only=True):
    checkpoint_path: str | None = None


class QueueTrainResult(TrainResult, kw_only=True):
    job_id: str
    checkpoint_path: str | None = None
    queued_s: float = 0.0
    """Seconds between submission and the worker starting the job."""
    train_s: float = 0.0
    """Seconds the worker spent on the job."""


# --------------------------------------------------------------------------- wire


class ModelRef(msgspec.Struct, kw_only=True, frozen=True):
    """Which trainable model a job is for. Names are checked by ``validate``."""

    project: str
    name: str
    base_model: str

    def validate(self) -> ModelRef:
        validate_name(self.project, "project")
        validate_name(self.name, "model name")
        if not self.base_model:
            raise ValueError("base_model must not be empty")
        return self

    @property
    def key(self) -> str:
        """``project/name``: the model's identity in metrics labels and logs."""
        return f"{self.project}/{self.name}"


JobKind = Literal["train", "register", "delete_checkpoints"]


class TrainRequest(msgspec.Struct, kw_only=True, frozen=True):
    """The Celery message of a job; small. The groups travel separately (claim check).

    ``payload_key`` names the Redis key holding the msgpack of
    ``list[TrajectoryGroup]`` (train jobs only); ``keep_steps`` is for
    ``delete_checkpoints`` jobs.
    """

    job_id: str
    kind: JobKind
    model: ModelRef
    config: TrainConfig = TrainConfig()
    payload_key: str | None = None
    payload_bytes: int = 0
    submitted_at: float = 0.0
    keep_steps: list[int] = msgspec.field(default_factory=list)


class JobStatus(str, enum.Enum):
    """Where a job is in its life. Terminal states never change again."""

    QUEUED = "queued"  # in the broker, not yet taken by a worker; may be cancelled
    RUNNING = "running"  # a worker has started it (it is redelivered if the worker dies)
    SUCCEEDED = "succeeded"  # terminal: result recorded, its step exists on disk
    FAILED = "failed"  # terminal: error recorded; the job made no step
    CANCELLED = "cancelled"  # terminal: cancelled while queued; never ran

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobOutcome(msgspec.Struct, kw_only=True):
    """What the worker records when a job ends well."""

    step: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    checkpoint_path: str | None = None
    train_s: float = 0.0
    deleted_steps: list[int] = msgspec.field(default_factory=list)
    """Steps a ``delete_checkpoints`` job removed."""


CheckpointEventKind = Literal["saved", "deleted"]


class CheckpointEvent(msgspec.Struct, kw_only=True, frozen=True):
    """One entry of the ``trainq:checkpoints`` stream (fields are stored as strings)."""

    kind: CheckpointEventKind
    project: str
    model: str
    step: int
    path: str
    job_id: str = ""
    base_model: str = ""
    created_at: float = 0.0

    @property
    def inference_name(self) -> str:
        return f"{self.model}@{self.step}"


# --------------------------------------------------------------------- validation

_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def validate_groups(groups: list[TrajectoryGroup], *, allow_missing_logprobs: bool = False) -> None:
    """Raise ``ValueError`` naming the first bad field of ``groups``, else return.

    Checked on both sides of the queue: by the producer as it encodes
    (``encode_groups``), and by the worker after decoding (a raw payload never
    went through the first).
    """
    _checked_groups(groups, allow_missing_logprobs, pack=False)


def _checked_groups(groups: list[TrajectoryGroup], allow_missing_logprobs: bool, pack: bool) -> list[TrajectoryGroup]:
    """``groups`` validated; with ``pack``, as shallow copies whose choices hold packed logprobs."""
    if not groups:
        raise ValueError("groups: at least one trajectory group is needed")
    checked = []
    for g, group in enumerate(groups):
        if not group.trajectories:
            raise ValueError(f"groups[{g}].trajectories: a group needs at least one trajectory")
        trajectories = [
            _checked_trajectory(trajectory, f"groups[{g}].trajectories[{t}]", allow_missing_logprobs, pack)
            for t, trajectory in enumerate(group.trajectories)
        ]
        checked.append(msgspec.structs.replace(group, trajectories=trajectories) if pack else group)
    return checked


def _checked_trajectory(trajectory: Trajectory, where: str, allow_missing_logprobs: bool, pack: bool) -> Trajectory:
    if not math.isfinite(trajectory.reward):
        raise ValueError(f"{where}.reward: must be finite, got {trajectory.reward!r}")
    items: list[MessageOrChoice] = []
    n_choices = 0
    for i, item in enumerate(trajectory.messages_and_choices):
        at = f"{where}.messages_and_choices[{i}]"
        if isinstance(item, Choice):
            n_choices += 1
            item = _checked_choice(item, at, allow_missing_logprobs, pack)
        else:
            _validate_message(item, at)
        items.append(item)
    if n_choices == 0:
        raise ValueError(f"{where}.messages_and_choices: no sampled Choice to train on")
    return msgspec.structs.replace(trajectory, messages_and_choices=items) if pack else trajectory


def _validate_message(message: dict[str, Any], at: str) -> None:
    if not isinstance(role := message.get("role"), str) or role not in _MESSAGE_ROLES:
        raise ValueError(f"{at}.role: must be one of {sorted(_MESSAGE_ROLES)}, got {role!r}")
    # Chat templates concatenate content as text (or iterate content parts): anything
    # else would fail inside the worker's template with an error that names nothing.
    content = message.get("content")
    if not (content is None or isinstance(content, str) or _is_content_parts(content)):
        raise ValueError(
            f"{at}.content: must be a string, a list of content part dicts or None, got {type(content).__name__}"
        )


def _is_content_parts(content: object) -> bool:
    return isinstance(content, list) and all(isinstance(part, dict) for part in content)


def _checked_choice(choice: Choice, at: str, allow_missing_logprobs: bool, pack: bool) -> Choice:
    if not choice.token_ids:
        raise ValueError(f"{at}.token_ids: a sampled turn needs at least one token")
    if min(choice.token_ids) < 0:
        raise ValueError(f"{at}.token_ids: token ids must be >= 0")
    if not choice.logprobs and allow_missing_logprobs:
        return choice
    if len(choice.logprobs) != len(choice.token_ids):
        raise ValueError(
            f"{at}.logprobs: {len(choice.logprobs)} logprobs for {len(choice.token_ids)} token_ids; "
            "they must be of equal length"
            + ("" if choice.logprobs else " (pass allow_training_without_logprobs=True to train without them)")
        )
    packed = _packed_logprobs(choice.logprobs, at) if pack else None
    if not _logprobs_in_range(choice.logprobs, packed):
        raise ValueError(f"{at}.logprobs: every logprob must be finite and <= 0")
    if packed is None:
        return choice
    # copy.copy, not structs.replace: replace runs __post_init__, which would unpack again.
    sent = copy.copy(choice)
    sent.logprobs = packed
    return sent


def _packed_logprobs(values: Sequence[float] | bytes, at: str) -> bytes:
    if type(values) is bytes:
        return values
    try:
        return _pack_float32(values)
    except (OverflowError, struct.error) as exc:
        raise ValueError(f"{at}.logprobs: cannot be sent as float32 ({exc})") from None


def _logprobs_in_range(values: Sequence[float] | bytes, packed: bytes | None) -> bool:
    """Every logprob finite and <= 0; ``packed``: the same values as little-endian float32."""
    if packed is None and isinstance(values, array.array) and values.typecode == "f":
        packed = _pack_float32(values)  # a decoded choice's: a copy of its bytes
    if packed is not None and _float32_all_negative(packed):
        return True
    if type(values) is bytes:
        values = _float32_array(values)
    # max() and sum() loop in C, but each value is a Python float: ~20 ns a logprob.
    # A sum of values <= 0 is finite exactly when each one is: NaN and infinities propagate.
    return max(values) <= 0.0 and math.isfinite(sum(values))


_SIGN_SET = bytes(range(0x80, 0x100))


def _float32_all_negative(packed: bytes) -> bool:
    """True if every little-endian float32 in ``packed`` is certainly negative and finite.

    Read off each value's top byte (sign bit and the exponent's 7 high bits), in
    C-speed byte operations, ~10x faster than comparing Python floats: a set
    sign bit everywhere, and no top byte 0xFF (which holds the non-finite values,
    and the finite ones beyond -1.7e38). False means "look closer": +0.0 and
    those huge values are valid and go to the exact check.
    """
    top = packed[3::4]
    return not top.translate(None, _SIGN_SET) and 0xFF not in top
