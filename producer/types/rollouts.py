"""The rollout records: what a sampler produced (``Choice``), one rollout (``Trajectory``) and a group of them.

A train job's groups are encoded by ``producer.validation.encode_groups`` (the
one place that writes them) and decoded by a plain
``msgspec.msgpack.Decoder(list[TrajectoryGroup])``.

These records also take the forms OpenPipe ART's code builds (see README,
"Coming from ART"): an ``openai`` chat choice where a ``Choice`` goes, a message
dict as a choice's ``message``, a group built from rollouts still to be awaited,
int and bool metrics. Their ``__post_init__`` turns those into the records
below; it runs on every decode too, so it stays a few type checks for records
already in shape.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import traceback
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from typing import Any

import msgspec

from producer import _float32

__all__ = [
    "SAMPLER_FIELD",
    "Choice",
    "ChoiceMessage",
    "ExceptionInfo",
    "MessageOrChoice",
    "Trajectory",
    "TrajectoryGroup",
    "as_float_metrics",
    "as_messages_and_choices",
    "choice_as_message",
]

SAMPLER_FIELD = "trainq_sampler"
"""What trainq's inference worker adds to each choice of a completion: ``{"model", "temperature",
"prompt_token_ids"}`` of the request (``inference_worker/request_defaults.py``; read by ``Choice.from_openai``)."""

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
