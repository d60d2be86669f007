"""What a train job's groups must be, checked on both sides of the queue, and how they are encoded.

``encode_groups`` (the producer, before anything is queued) and
``validate_groups`` (the worker, after its typed decode; a raw payload never
went through the first) raise a ``ValueError`` naming the first bad field by
its path, ``groups[g].trajectories[t].messages_and_choices[i].logprobs``.
"""

from __future__ import annotations

import copy
import math
import struct
from collections.abc import Sequence
from typing import Any

import msgspec

from producer import _float32
from producer._openai import HOW_TO_REQUEST, choice_from_openai, is_openai_choice
from producer.types import (
    Choice,
    MessageOrChoice,
    Trajectory,
    TrajectoryGroup,
    as_float_metrics,
    as_messages_and_choices,
)

__all__ = ["encode_groups", "validate_groups"]

_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_groups_encoder = msgspec.msgpack.Encoder()


def encode_groups(groups: Sequence[TrajectoryGroup], *, allow_missing_logprobs: bool = False) -> bytes:
    """``validate_groups``, then the msgpack of the groups with every choice's logprobs packed as float32.

    One pass: each choice's logprobs are packed once, and their values checked
    on the packed bytes (``_float32.all_negative``). The caller's records keep
    their values: what the encoder sees are shallow copies holding the packed
    bytes. A logprob beyond float32's range is a ``ValueError`` naming it.
    """
    return _groups_encoder.encode(_checked_groups(groups, allow_missing_logprobs, pack=True))


def validate_groups(groups: Sequence[TrajectoryGroup], *, allow_missing_logprobs: bool = False) -> None:
    """Raise ``ValueError`` naming the first bad field of ``groups``, else return."""
    _checked_groups(groups, allow_missing_logprobs, pack=False)


def _checked_groups(groups: Sequence[TrajectoryGroup], allow_missing_logprobs: bool, pack: bool) -> list[TrajectoryGroup]:
    """``groups`` validated; with ``pack``, as shallow copies whose choices hold packed logprobs."""
    if not groups:
        raise ValueError("groups: at least one trajectory group is needed")
    checked = []
    for g, group in enumerate(groups):
        if not isinstance(group, TrajectoryGroup):
            raise ValueError(f"groups[{g}]: expected a TrajectoryGroup, got {type(group).__name__}")
        if not group.trajectories:
            raise ValueError(f"groups[{g}].trajectories: a group needs at least one trajectory")
        trajectories = [
            _checked_trajectory(trajectory, f"groups[{g}].trajectories[{t}]", allow_missing_logprobs, pack)
            for t, trajectory in enumerate(group.trajectories)
        ]
        checked.append(msgspec.structs.replace(group, trajectories=trajectories) if pack else group)
    return checked


def _checked_trajectory(trajectory: Any, where: str, allow_missing_logprobs: bool, pack: bool) -> Trajectory:
    if not isinstance(trajectory, Trajectory):
        hint = (": await the group (or pass it through gather_trajectory_groups) before training"
                if hasattr(trajectory, "__await__") else "")
        raise ValueError(f"{where}: expected a Trajectory, got {type(trajectory).__name__}{hint}")
    if not _is_number(trajectory.reward) or not math.isfinite(trajectory.reward):
        raise ValueError(f"{where}.reward: must be a finite number, got {trajectory.reward!r}")
    # Rollout code may have appended openai choices or set int/bool metrics since construction.
    trajectory.messages_and_choices = as_messages_and_choices(trajectory.messages_and_choices)
    trajectory.metrics = as_float_metrics(trajectory.metrics)
    for key, value in trajectory.metrics.items():
        if not isinstance(key, str) or type(value) is not float:
            raise ValueError(f"{where}.metrics[{key!r}]: must be a number, got {type(value).__name__}")
    items: list[MessageOrChoice] = []
    n_choices = 0
    for i, item in enumerate(trajectory.messages_and_choices):
        at = f"{where}.messages_and_choices[{i}]"
        if isinstance(item, Choice):
            n_choices += 1
            item = _checked_choice(item, at, allow_missing_logprobs, pack)
        elif isinstance(item, dict):
            _validate_message(item, at)
        else:
            raise ValueError(_not_an_item(item, at))
        items.append(item)
    if n_choices == 0:
        raise ValueError(f"{where}.messages_and_choices: no sampled Choice to train on")
    return msgspec.structs.replace(trajectory, messages_and_choices=items) if pack else trajectory


def _not_an_item(item: Any, at: str) -> str:
    if is_openai_choice(item):
        try:  # what kept it from becoming a Choice when the trajectory was built
            choice_from_openai(Choice, item, allow_missing_logprobs=True)
        except ValueError as exc:
            return f"{at}: the openai choice cannot be trained on: {exc}"
    return f"{at}: expected a chat message dict or a Choice, got {type(item).__name__}"


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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_choice(choice: Choice, at: str, allow_missing_logprobs: bool, pack: bool) -> Choice:
    if not choice.token_ids:
        raise ValueError(f"{at}.token_ids: a sampled turn needs at least one token")
    if min(choice.token_ids) < 0:
        raise ValueError(f"{at}.token_ids: token ids must be >= 0")
    if choice.prompt_token_ids is not None and (not choice.prompt_token_ids or min(choice.prompt_token_ids) < 0):
        raise ValueError(f"{at}.prompt_token_ids: None, or a non-empty list of token ids >= 0")
    if choice.temperature is not None and not (_is_number(choice.temperature) and math.isfinite(choice.temperature)
                                               and choice.temperature >= 0):
        raise ValueError(f"{at}.temperature: None or a finite number >= 0, got {choice.temperature!r}")
    if not choice.logprobs:
        if allow_missing_logprobs:
            return choice
        raise ValueError(
            f"{at}.logprobs: the sampler returned none ({HOW_TO_REQUEST}); "
            "or pass allow_training_without_logprobs=True to train without them"
        )
    if len(choice.logprobs) != len(choice.token_ids):
        raise ValueError(
            f"{at}.logprobs: {len(choice.logprobs)} logprobs for {len(choice.token_ids)} token_ids; "
            "they must be of equal length"
        )
    packed = _packed_logprobs(choice.logprobs, at) if pack else None
    if not _float32.logprobs_in_range(choice.logprobs, packed):
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
        return _float32.pack(values)
    except (OverflowError, struct.error) as exc:
        raise ValueError(f"{at}.logprobs: cannot be sent as float32 ({exc})") from None
