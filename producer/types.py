"""The wire contract: every record that crosses a process boundary.

All three packages import this module; it imports only msgspec and the
standard library. Records evolve by msgspec's schema-evolution rules: a new
field gets a default and goes last, no field is ever reordered or renamed, and
a field's type only ever widens, so that readers accept what older writers
sent. Nothing here is ever pickled.

A train job's groups are encoded by ``producer.validation.encode_groups`` (the
one place that writes them) and decoded by a plain
``msgspec.msgpack.Decoder(list[TrajectoryGroup])``.

The rollout records (``Choice``, ``Trajectory``, ``TrajectoryGroup``) also take
the forms OpenPipe ART's code builds (see README, "Coming from ART"): an
``openai`` chat choice where a ``Choice`` goes, a message dict as a choice's
``message``, a group built from rollouts still to be awaited, int and bool
metrics. Their ``__post_init__`` turns those into the records below; it runs on
every decode too, so it stays a few type checks for records already in shape.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import math
import time
import traceback
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from typing import Any, Literal

import msgspec

from producer import _float32
from producer.names import inference_name, validate_name

__all__ = [
    "SAMPLER_FIELD",
    "CheckpointEvent",
    "Choice",
    "ChoiceMessage",
    "ExceptionInfo",
    "JobOutcome",
    "JobStatus",
    "LocalTrainResult",
    "ModelRef",
    "QueueTrainResult",
    "TrainConfig",
    "TrainRequest",
    "TrainResult",
    "Trajectory",
    "TrajectoryGroup",
]

SAMPLER_FIELD = "trainq_sampler"
"""What trainq's inference worker adds to each choice of a completion: ``{"model", "temperature",
"prompt_token_ids"}`` of the request (``inference_worker/request_defaults.py``; read by ``Choice.from_openai``)."""

# --------------------------------------------------------------------------- data

# The records a payload holds by the thousand are not tracked by Python's cycle
# collector (``gc=False``): decoding a 1 MB job took ~1.2 ms (15%) less on the
# worker (bench/bench_payload.py). They are plain data: a reference cycle
# through one of them (a trajectory stored in its own ``metadata``) would never
# be collected.


class ChoiceMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The assistant message a sampler produced (OpenAI shape)."""

    content: str | None = None
    role: str = "assistant"
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    """The reasoning a reasoning model produced before ``content``, when the server returns it apart."""

    @classmethod
    def from_dict(cls, message: dict[str, Any]) -> ChoiceMessage:
        """From an OpenAI message dict; keys this record does not hold (``refusal``, ``annotations``) are dropped."""
        if not isinstance(message, dict):
            raise TypeError(f"a choice's message must be a ChoiceMessage or a dict, got {type(message).__name__}")
        return cls(
            content=message.get("content"),
            role=message.get("role") or "assistant",
            tool_calls=message.get("tool_calls") or None,
            reasoning_content=message.get("reasoning_content"),
        )


class Choice(msgspec.Struct, kw_only=True, array_like=True, tag="choice", gc=False):
    """One sampled assistant turn, exactly as the sampler produced it and saw it.

    Invariants: ``len(token_ids) == len(logprobs)`` (or no logprobs at all);
    ``logprobs[i]`` is the sampler's log-probability of ``token_ids[i]`` under
    the distribution it sampled from (at ``temperature``);
    ``prompt_token_ids`` are the tokens the sampler was given for this turn.
    The trainer scores exactly ``prompt_token_ids + token_ids`` and never
    re-tokenizes ``message``.

    Encoded as a tagged array so that it can share a list with plain chat
    message dicts (which encode as maps) in ``Trajectory.messages_and_choices``.

    ``logprobs`` is a sequence of floats. On the wire (``encode_groups``) it
    travels as packed little-endian float32 bytes (``producer._float32``).
    Packed bytes, given here or decoded, become an ``array.array("f")``
    (indexing, iteration, ``len``, ``sum`` as a list; ``list(...)`` for a list).
    A plain float list (what rollout code builds, and what older producers
    sent) is kept as it is. ``message`` may be given as a dict.
    """

    token_ids: list[int]
    logprobs: Sequence[float] | bytes  # a list as given; bytes become an array("f") (see above)
    message: ChoiceMessage = msgspec.field(default_factory=ChoiceMessage)
    finish_reason: str | None = None
    sampled_step: int | None = None
    """The step of the adapter that sampled this turn (from ``name@step``), if known."""
    prompt_token_ids: list[int] | None = None
    """The tokens the sampler was given for this turn (vLLM's ``return_token_ids``); ``None`` if unknown."""
    temperature: float | None = None
    """The temperature this turn was sampled at; ``None`` if unknown (scored at 1.0)."""

    def __post_init__(self) -> None:
        if type(self.logprobs) is bytes:
            self.logprobs = _float32.unpack(self.logprobs)
        if type(self.message) is dict:
            self.message = ChoiceMessage.from_dict(self.message)

    @classmethod
    def from_openai(
        cls,
        choice: Any,
        inference_name: str | None = None,
        *,
        temperature: float | None = None,
        allow_missing_logprobs: bool = False,
    ) -> Choice:
        """Convert an ``openai`` chat choice, or a whole ``ChatCompletion``, sampled by vLLM.

        ``choice`` is a ``ChatCompletion`` (its first choice is used, its
        ``model`` gives the sampled step and its ``prompt_token_ids`` the
        prompt) or one of its ``choices``; pass ``inference_name``
        (``name@step``) with a bare choice from another server to record the
        step, and ``temperature`` if the server does not report it. trainq's
        inference worker returns everything needed on every request; another
        vLLM must be asked for ``logprobs=True`` and
        ``extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True}``.
        Raises ``ValueError`` when the choice carries no token ids, or no
        logprobs unless ``allow_missing_logprobs``.
        """
        from producer._openai import choice_from_openai  # keeps this module free of the conversion code

        return choice_from_openai(
            cls, choice, inference_name, temperature=temperature, allow_missing_logprobs=allow_missing_logprobs
        )


class ExceptionInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A rollout that raised instead of producing a trajectory."""

    type: str
    message: str = ""
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ExceptionInfo:
        return cls(
            type=type(exc).__name__,
            message=str(exc),
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        )


MessageOrChoice = dict[str, Any] | Choice


class Trajectory(msgspec.Struct, array_like=True, gc=False):
    """One rollout: the conversation (chat message dicts and sampled ``Choice`` s) and its reward.

    Encoded as an array (fields by position): a payload holds thousands of
    trajectories, and field names in each would cost bytes and decode time
    (bench/bench_payload.py). New fields therefore go last, with a default.

    ``metrics`` are numbers; ints and bools (``metrics["win"] = True``) are
    taken as floats. An ``openai`` chat choice in ``messages_and_choices`` is
    converted to a ``Choice`` here, and again when the trajectory is encoded or
    logged (for choices appended later).
    """

    messages_and_choices: list[MessageOrChoice] = msgspec.field(default_factory=list)
    reward: float = 0.0
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    logs: list[str] = msgspec.field(default_factory=list)
    start_time: float | None = None
    """When the rollout began (seconds since the epoch; set at construction); ``finish()`` measures from it."""

    def __post_init__(self) -> None:
        if self.start_time is None:
            self.start_time = time.time()
        self.messages_and_choices = as_messages_and_choices(self.messages_and_choices)
        self.metrics = as_float_metrics(self.metrics)

    def choices(self) -> list[Choice]:
        """The sampled turns, in order."""
        return [item for item in self.messages_and_choices if isinstance(item, Choice)]

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat message dicts, sampled turns as assistant messages: what a next request sends."""
        return [
            item if isinstance(item, dict) else choice_as_message(item)
            for item in as_messages_and_choices(self.messages_and_choices)
        ]

    def finish(self) -> Trajectory:
        """Record ``metrics["duration"]``, the seconds since the rollout began; returns the trajectory."""
        self.metrics["duration"] = time.time() - (self.start_time or time.time())
        return self

    @contextlib.asynccontextmanager
    async def track_duration(self, metric_name: str) -> AsyncIterator[None]:
        """Add the seconds spent in the block to ``metrics[f"{metric_name}_duration"]``."""
        started = time.monotonic()
        try:
            yield
        finally:
            key = f"{metric_name}_duration"
            self.metrics[key] = self.metrics.get(key, 0.0) + time.monotonic() - started


class TrajectoryGroup(msgspec.Struct, array_like=True, gc=False):
    """Trajectories of one prompt, compared with each other for advantages.

    Encoded as an array, as ``Trajectory`` is; new fields go last, with a default.

    ``sampled_step`` is the adapter step the group was sampled at; when left
    ``None`` it is derived from the choices' ``sampled_step`` (the oldest one).

    Built from any iterable: ``Trajectory`` s, exceptions (recorded in
    ``exceptions``), or awaitables of ``Trajectory`` (rollouts not yet run).
    A group holding awaitables is awaited (``await group``, or through
    ``gather_trajectory_groups``), which runs them concurrently and puts their
    trajectories in their place. A group iterates over, and has the length of,
    its trajectories.
    """

    trajectories: list[Trajectory]
    exceptions: list[ExceptionInfo] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    sampled_step: int | None = None

    def __post_init__(self) -> None:
        items: list[Any] = self.trajectories if type(self.trajectories) is list else list(self.trajectories)
        exceptions: list[Any] = list(self.exceptions)
        if any(type(item) is not Trajectory for item in items):
            exceptions += [item for item in items if isinstance(item, BaseException)]
            items = [_rollout_or_trajectory(item) for item in items if not isinstance(item, BaseException)]
        self.trajectories = items
        if any(not isinstance(info, ExceptionInfo) for info in exceptions):
            exceptions = [_as_exception_info(info) for info in exceptions]
        self.exceptions = exceptions

    def __iter__(self) -> Iterator[Trajectory]:
        return iter(self.trajectories)

    def __len__(self) -> int:
        return len(self.trajectories)

    def __await__(self) -> Generator[Any, None, TrajectoryGroup]:
        """Run the rollouts still pending, concurrently; the first exception is raised, the rest cancelled."""
        from producer.gather import resolve_group

        return resolve_group(self).__await__()

    @property
    def pending(self) -> list[Any]:
        """The awaitables of rollouts not yet run (empty once the group is awaited)."""
        return [item for item in self.trajectories if not isinstance(item, Trajectory)]

    def effective_sampled_step(self) -> int | None:
        """``sampled_step`` if set, else the oldest step any of its choices was sampled at."""
        if self.sampled_step is not None:
            return self.sampled_step
        steps = [
            c.sampled_step for t in self.trajectories if isinstance(t, Trajectory)
            for c in t.choices() if c.sampled_step is not None
        ]
        return min(steps) if steps else None


def _rollout_or_trajectory(item: Any) -> Any:
    if isinstance(item, Trajectory) or inspect.isawaitable(item):
        return item
    raise TypeError(
        f"a TrajectoryGroup holds Trajectory objects, exceptions or awaitables of Trajectory, got {type(item).__name__}"
    )


def _as_exception_info(value: Any) -> ExceptionInfo:
    if isinstance(value, ExceptionInfo):
        return value
    if isinstance(value, BaseException):
        return ExceptionInfo.from_exception(value)
    raise TypeError(f"a group's exceptions are ExceptionInfo or exceptions, got {type(value).__name__}")


def as_messages_and_choices(items: Any) -> list[Any]:
    """``items`` as a list, each ``openai`` choice in it converted to a ``Choice`` where it can be.

    A choice that carries no token ids is left as it is: ``validate_groups``
    then names it and says how to request them.
    """
    items = items if type(items) is list else list(items)
    for index, item in enumerate(items):
        if type(item) is not dict and type(item) is not Choice:
            from producer._openai import converted_item

            items[index] = converted_item(item)
    return items


def as_float_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with ints and bools as floats (ART allows them); anything else is left for validation to name."""
    if all(type(value) is float for value in metrics.values()):
        return metrics
    return {key: float(value) if isinstance(value, (int, bool)) else value for key, value in metrics.items()}


def choice_as_message(choice: Choice | Any) -> dict[str, Any]:
    """The chat message dict of a sampled turn, as a next request (or a chat template) takes it."""
    if not isinstance(choice, Choice):
        from producer._openai import message_of

        return message_of(choice)
    message: dict[str, Any] = {"role": "assistant", "content": choice.message.content or ""}
    if choice.message.tool_calls:
        message["tool_calls"] = choice.message.tool_calls
    return message


# ------------------------------------------------------------------------- config


ImportanceSamplingLevel = Literal["token", "sequence", "average", "geometric_average"]
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence", "average", "geometric_average")


class TrainConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How one train step is run. Every field is a keyword of ``backend.train``.

    Values are checked at construction, on the producer, before anything is
    queued: a bad one is a ``ValueError`` naming it.
    """

    learning_rate: float = 5e-6
    """AdamW learning rate of the LoRA parameters; > 0."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the base model (adapter disabled); >= 0, 0 skips it."""
    ppo: bool = False
    """PPO clipped surrogate when true; CISPO-style clipped-weight policy gradient otherwise."""
    epsilon: float | None = None
    """Lower clip range; default 0.2 for PPO; for CISPO a lower bound of the weight (1 - epsilon) if given."""
    epsilon_high: float | None = None
    """Upper clip range; defaults to ``epsilon`` for PPO and to 0.28 for CISPO (see the README)."""
    scale_rewards: bool = True
    """Divide group-relative advantages by the group's reward std (+1e-6)."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """Importance ratio per token, per sequence (geometric mean, GSPO), or their arithmetic or geometric average."""
    max_staleness: int | None = None
    """Drop groups sampled more than this many steps before the latest; None keeps all."""
    allow_training_without_logprobs: bool = False
    """Accept choices without sampler logprobs, using the trainer's own (ratio 1)."""
    advantage_balance: float = 0.0
    """In [-1, 1]: positive advantages weigh ``1 + b``, negative ones ``1 - b`` (1 trains only on positive)."""
    max_negative_advantage_importance_sampling_weight: float | None = None
    """Cap of the importance ratio of tokens with a negative advantage; > 0."""
    mask_prob_ratio: bool = False
    """Drop the tokens whose ratio is outside the clip range from the loss, instead of clipping them."""
    truncated_importance_sampling: float | None = None
    """Weigh each token by ``min(pi_trainer / pi_sampler, value)``, detached, and take the policy
    ratio against the trainer's own log-probabilities: truncated importance sampling (Yao et al. 2025)
    against the training-inference mismatch; >= 1."""
    scale_learning_rate_by_reward_std_dev: bool = False
    """Multiply the learning rate by the step's mean within-group reward standard deviation."""
    num_trajectories_learning_rate_multiplier_power: float = 0.0
    """Multiply the learning rate by (trajectories trained) ** power; 0 leaves it as it is."""
    kimi_k2_tau: float | None = None
    """Subtract ``tau * (log pi_trainer - log pi_sampler)`` (detached) from each token's advantage (Kimi K2)."""

    def __post_init__(self) -> None:
        _check(_finite(self.learning_rate) and self.learning_rate > 0, "learning_rate", "a finite number > 0", self.learning_rate)
        _check(_finite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0", self.beta)
        for field in ("epsilon", "epsilon_high", "max_negative_advantage_importance_sampling_weight"):
            value = getattr(self, field)
            _check(value is None or (_finite(value) and value > 0), field, "None or a finite number > 0", value)
        for field in ("ppo", "scale_rewards", "allow_training_without_logprobs", "mask_prob_ratio",
                      "scale_learning_rate_by_reward_std_dev"):
            _check(isinstance(getattr(self, field), bool), field, "True or False", getattr(self, field))
        _check(self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level",
               f"one of {', '.join(map(repr, IMPORTANCE_SAMPLING_LEVELS))}", self.importance_sampling_level)
        _check(self.max_staleness is None or (_is_int(self.max_staleness) and self.max_staleness >= 0),
               "max_staleness", "None or an int >= 0", self.max_staleness)
        _check(_finite(self.advantage_balance) and -1.0 <= self.advantage_balance <= 1.0, "advantage_balance",
               "a number in [-1, 1]", self.advantage_balance)
        _check(self.truncated_importance_sampling is None
               or (_finite(self.truncated_importance_sampling) and self.truncated_importance_sampling >= 1.0),
               "truncated_importance_sampling", "None or a finite number >= 1", self.truncated_importance_sampling)
        _check(_finite(self.num_trajectories_learning_rate_multiplier_power),
               "num_trajectories_learning_rate_multiplier_power", "a finite number",
               self.num_trajectories_learning_rate_multiplier_power)
        _check(self.kimi_k2_tau is None or (_finite(self.kimi_k2_tau) and self.kimi_k2_tau >= 0), "kimi_k2_tau",
               "None or a finite number >= 0", self.kimi_k2_tau)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


# ------------------------------------------------------------------------ results


class TrainResult(msgspec.Struct, kw_only=True):
    """What a train call returns: the new step and the step's metrics."""

    step: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class LocalTrainResult(TrainResult, kw_only=True):
    """A train result with the new step's checkpoint folder (ART's ``art.types.LocalTrainResult``)."""

    checkpoint_path: str | None = None


class QueueTrainResult(LocalTrainResult, kw_only=True):
    """A train result of a job that went through the queue: also its id and where its time went."""

    job_id: str
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
        return inference_name(self.model, self.step)
