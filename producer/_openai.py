"""``openai`` completions (from vLLM) as trainq's ``Choice``.

Reads the openai objects by attribute, or by key for their JSON dicts, and
never imports openai. What a vLLM completion can carry, and where:

- the sampled tokens' logprobs: ``choice.logprobs.content[i].logprob`` (chat)
  or ``choice.logprobs.token_logprobs[i]`` (text), with each token written
  ``token_id:N`` when the server returns tokens as ids;
- the sampled token ids: ``choice.token_ids`` (vLLM's ``return_token_ids``);
- the prompt's token ids: ``completion.prompt_token_ids`` (chat) or
  ``choice.prompt_token_ids`` (text);
- what trainq's inference worker adds to each choice, ``choice.trainq_sampler``:
  the request's ``model`` (``name@step``), its ``temperature`` and the prompt's
  token ids, so that a bare choice (ART puts ``completion.choices[0]`` in a
  trajectory) carries everything the trainer needs
  (``inference_worker/request_defaults.py``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from producer.names import parse_inference_name
from producer.types import SAMPLER_FIELD, Choice, ChoiceMessage

__all__ = ["HOW_TO_REQUEST", "choice_from_openai", "converted_item", "is_openai_choice", "message_of"]

C = TypeVar("C", bound=Choice)

HOW_TO_REQUEST = (
    "trainq's inference worker returns logprobs and token ids on every request unless the request turns them off; "
    "from another vLLM request logprobs=True and extra_body={'return_tokens_as_token_ids': True, "
    "'return_token_ids': True}"
)
_TOKEN_ID_PREFIX = "token_id:"


def choice_from_openai(
    cls: type[C],
    choice: Any,
    inference_name: str | None = None,
    *,
    temperature: float | None = None,
    allow_missing_logprobs: bool = False,
) -> C:
    """Build ``cls`` (a ``Choice``) from a completion or one of its choices; see ``Choice.from_openai``."""
    prompt_token_ids = None
    choices = _get(choice, "choices")
    if choices is not None:  # a whole completion
        if not choices:
            raise ValueError("the completion has no choices")
        inference_name = inference_name or _get(choice, "model")
        prompt_token_ids = _get(choice, "prompt_token_ids")
        choice = choices[0]
    sampler = _get(choice, SAMPLER_FIELD) or {}
    token_ids, logprobs = _sampled_tokens(choice)
    if not logprobs and not allow_missing_logprobs:
        raise ValueError(f"the choice has no logprobs: {HOW_TO_REQUEST}")
    parsed = parse_inference_name(inference_name or _get(sampler, "model"))
    if temperature is None:
        temperature = _get(sampler, "temperature")
    prompt = prompt_token_ids or _get(sampler, "prompt_token_ids") or _get(choice, "prompt_token_ids")
    return cls(
        token_ids=token_ids,
        logprobs=logprobs,
        message=_message(choice),
        finish_reason=_get(choice, "finish_reason"),
        sampled_step=parsed[1] if parsed else None,
        prompt_token_ids=[int(t) for t in prompt] if prompt else None,
        temperature=None if temperature is None else float(temperature),
    )


def is_openai_choice(item: Any) -> bool:
    """Whether ``item`` is an openai chat or text choice, or a whole completion (an object or its JSON dict)."""
    if isinstance(item, dict):
        return "role" not in item and any(key in item for key in ("choices", "message", "text"))
    return any(hasattr(item, attr) for attr in ("choices", "message", "text")) and hasattr(item, "model_dump")


def converted_item(item: Any) -> Any:
    """An item of ``messages_and_choices``: an openai choice becomes a ``Choice`` if it carries token ids,
    an openai message object (``choice.message``) the message dict it stands for.

    Anything else, and a choice without token ids, is returned as it is, for
    validation to name where it is and what is missing.
    """
    if not is_openai_choice(item):
        if hasattr(item, "model_dump") and isinstance(getattr(item, "role", None), str):
            dumped: dict[str, Any] = item.model_dump(mode="json", exclude_none=True)
            return dumped
        return item
    try:
        return choice_from_openai(Choice, item, allow_missing_logprobs=True)
    except ValueError:
        return item


def message_of(choice: Any) -> dict[str, Any]:
    """The assistant message dict of an openai choice (or completion), for the next request or a log."""
    choices = _get(choice, "choices")
    if choices:
        choice = choices[0]
    message = _message(choice)
    result: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
    if message.tool_calls:
        result["tool_calls"] = message.tool_calls
    return result


def _sampled_tokens(choice: Any) -> tuple[list[int], list[float]]:
    """The choice's token ids and their logprobs (empty if the server sent none); ``ValueError`` without ids."""
    entries = _logprob_entries(choice)
    returned_ids = _get(choice, "token_ids")
    logprobs = [float(logprob) for _, logprob in entries]
    if returned_ids is not None:
        token_ids = [int(t) for t in returned_ids]
        if entries and len(entries) != len(token_ids):
            raise ValueError(f"the choice has {len(token_ids)} token ids but {len(entries)} logprobs")
        return token_ids, logprobs
    if not entries:
        raise ValueError(f"the choice carries no token ids: {HOW_TO_REQUEST}")
    return [_token_id(token, position) for position, (token, _) in enumerate(entries)], logprobs


def _logprob_entries(choice: Any) -> list[tuple[str, float]]:
    """``(token, logprob)`` per sampled token, from a chat or a text choice's ``logprobs``."""
    logprobs = _get(choice, "logprobs")
    content = _get(logprobs, "content")
    if content is not None:  # chat
        return [(_get(entry, "token") or "", _get(entry, "logprob")) for entry in content]
    tokens, values = _get(logprobs, "tokens"), _get(logprobs, "token_logprobs")
    if tokens is not None and values is not None:  # text completion
        return list(zip(tokens, values, strict=True))
    return []


def _token_id(token: str, position: int) -> int:
    if not token.startswith(_TOKEN_ID_PREFIX):
        raise ValueError(f"logprobs token {position} is {token!r}, not 'token_id:N': {HOW_TO_REQUEST}")
    try:
        return int(token[len(_TOKEN_ID_PREFIX):])
    except ValueError:
        raise ValueError(f"logprobs token {position} is {token!r}, not 'token_id:N'") from None


def _message(choice: Any) -> ChoiceMessage:
    message = _get(choice, "message")
    if message is None:  # a text completion's choice
        return ChoiceMessage(content=_get(choice, "text"))
    tool_calls = _get(message, "tool_calls")
    return ChoiceMessage(
        content=_get(message, "content"),
        role=_get(message, "role") or "assistant",
        tool_calls=[_as_dict(call) for call in tool_calls] if tool_calls else None,
        reasoning_content=_get(message, "reasoning_content"),
    )


def _as_dict(value: Any) -> dict[str, Any]:
    """A pydantic model (openai's types) or a dict, as a plain JSON-able dict."""
    if isinstance(value, dict):
        return value
    dumped: dict[str, Any] = value.model_dump(mode="json", exclude_none=True)
    return dumped


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    value = getattr(obj, key, None)
    if value is None:  # openai's models keep fields they do not declare in model_extra
        extra = getattr(obj, "model_extra", None)
        if isinstance(extra, dict):
            value = extra.get(key)
    return value
