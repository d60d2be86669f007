"""``Choice.from_openai``: an ``openai`` chat completion (vLLM, with token ids) as a ``Choice``.

Kept apart from ``producer.types`` so the wire contract imports nothing but
msgspec; this module reads the openai objects by attribute (or dict key, for
raw JSON) and never imports openai either.
"""

from __future__ import annotations

from typing import Any, TypeVar

from producer.types import ChoiceMessage, parse_inference_name

__all__ = ["choice_from_openai"]

C = TypeVar("C")

_HOW_TO_REQUEST = (
    "request with logprobs=True and extra_body={'return_tokens_as_token_ids': True} "
    "(vLLM then returns every sampled token as 'token_id:N' with its logprob)"
)
_TOKEN_ID_PREFIX = "token_id:"


def choice_from_openai(cls: type[C], choice: Any, inference_name: str | None = None) -> C:
    """Build ``cls`` (a ``Choice``) from a ``ChatCompletion`` or one of its ``choices``.

    ``inference_name`` (``name@step``) gives ``sampled_step``; for a whole
    completion it defaults to the completion's ``model``. Raises ``ValueError``
    when the choice carries no logprobs or no token ids.
    """
    choices = _get(choice, "choices")
    if choices is not None:  # a whole ChatCompletion
        if not choices:
            raise ValueError("the chat completion has no choices")
        inference_name = inference_name or _get(choice, "model")
        choice = choices[0]
    token_ids, logprobs = _sampled_tokens(choice)
    parsed = parse_inference_name(inference_name) if inference_name else None
    return cls(  # type: ignore[call-arg]
        token_ids=token_ids,
        logprobs=logprobs,
        message=_message(_get(choice, "message")),
        finish_reason=_get(choice, "finish_reason"),
        sampled_step=parsed[1] if parsed else None,
    )


def _sampled_tokens(choice: Any) -> tuple[list[int], list[float]]:
    content = _get(_get(choice, "logprobs"), "content")
    if content is None:
        raise ValueError(f"the choice has no logprobs: {_HOW_TO_REQUEST}")
    token_ids: list[int] = []
    logprobs: list[float] = []
    for position, entry in enumerate(content):
        token = _get(entry, "token") or ""
        if not token.startswith(_TOKEN_ID_PREFIX):
            raise ValueError(
                f"logprobs token {position} is {token!r}, not 'token_id:N': {_HOW_TO_REQUEST}"
            )
        try:
            token_ids.append(int(token[len(_TOKEN_ID_PREFIX):]))
        except ValueError:
            raise ValueError(f"logprobs token {position} is {token!r}, not 'token_id:N'") from None
        logprobs.append(float(_get(entry, "logprob")))
    return token_ids, logprobs


def _message(message: Any) -> ChoiceMessage:
    if message is None:
        return ChoiceMessage()
    tool_calls = _get(message, "tool_calls")
    return ChoiceMessage(
        content=_get(message, "content"),
        role=_get(message, "role") or "assistant",
        tool_calls=[_as_dict(call) for call in tool_calls] if tool_calls else None,
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
    return getattr(obj, key, None)
