"""Turn a ``Trajectory`` into one token sequence to train on.

The context (system, user, tool and plain assistant messages, and the template's
turn markers) is rendered with the base model's chat template; each sampled
``Choice`` contributes its ``token_ids`` verbatim, never re-tokenized, so the
trainer scores exactly the tokens the sampler produced. Only those tokens are
in ``assistant_mask``.

How the text between turns is found: the conversation up to a choice is
rendered with ``add_generation_prompt=True`` and the part after what the
template rendered for the conversation so far is tokenized as context. The end
of an assistant turn that the sampler did not emit itself (ChatML's
``<|im_end|>\\n`` after a choice that stopped on a stop string, or just the
``\\n`` after a sampled ``<|im_end|>``) is added as masked context, found by
rendering a sentinel assistant message and comparing in token space.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from producer.types import Choice, Trajectory

__all__ = ["TokenizedTrajectory", "choice_as_message", "tokenize_trajectory"]

_SENTINEL = "\u2063TRAINQ-SENTINEL\u2063"


@dataclass(frozen=True)
class TokenizedTrajectory:
    """One trajectory as a token sequence. All lists share the length of ``input_ids``.

    ``sampler_logprobs[i]`` is the sampler's log-probability of ``input_ids[i]``;
    it is meaningful only where ``logprobs_known[i]``, which implies
    ``assistant_mask[i]``. Elsewhere it is 0.0. It is an ``array("f")``: the
    logprobs arrive as float32 (``Choice``) and go to a float32 tensor
    (``packing``) without a Python float per token.
    """

    input_ids: list[int]
    assistant_mask: list[bool]
    sampler_logprobs: array
    logprobs_known: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained_tokens(self) -> int:
        return sum(self.assistant_mask)


def choice_as_message(choice: Choice) -> dict[str, Any]:
    """The chat message dict the template renders for a sampled turn (as history)."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.message.content or ""}
    if choice.message.tool_calls:
        message["tool_calls"] = choice.message.tool_calls
    return message


def tokenize_trajectory(
    trajectory: Trajectory,
    tokenizer: Any,
    *,
    vocab_size: int | None = None,
    max_length: int | None = None,
    allow_missing_logprobs: bool = False,
) -> TokenizedTrajectory:
    """Render ``trajectory`` with ``tokenizer``'s chat template around its verbatim choices.

    Args:
        trajectory: messages and sampled choices, in conversation order. Items
            after the last choice are dropped: no trained token can see them.
        tokenizer: a transformers tokenizer with a chat template.
        vocab_size: the model's embedding rows; a token id at or above it is a ``ValueError``.
        max_length: the model's position limit; a longer sequence is a ``ValueError``.
        allow_missing_logprobs: accept choices with empty ``logprobs`` (their
            tokens get ``logprobs_known=False``); otherwise that is a ``ValueError``.
    """
    render = _Renderer(tokenizer, trajectory.tools)
    ids: list[int] = []
    mask: list[bool] = []
    logps = array("f")
    known: list[bool] = []
    history: list[dict[str, Any]] = []
    rendered = ""  # the template's text for ``history`` (without a generation prompt)

    def add_context(text: str) -> None:
        context = render.encode(text)
        ids.extend(context)
        mask.extend([False] * len(context))
        _extend_zeros(logps, len(context))
        known.extend([False] * len(context))

    last_choice = max((i for i, it in enumerate(trajectory.messages_and_choices) if isinstance(it, Choice)), default=-1)
    if last_choice < 0:
        raise ValueError("messages_and_choices: no sampled Choice to train on")
    for index, item in enumerate(trajectory.messages_and_choices[: last_choice + 1]):
        if not isinstance(item, Choice):
            history.append(item)
            continue
        prompt = render.text(history, add_generation_prompt=True)
        add_context(_after(rendered, prompt, index))
        _check_choice(item, index, vocab_size, allow_missing_logprobs)
        ids.extend(item.token_ids)
        mask.extend([True] * len(item.token_ids))
        has_logps = bool(item.logprobs)
        if has_logps:
            logps.extend(_as_float32(item.logprobs))
        else:
            _extend_zeros(logps, len(item.token_ids))
        known.extend([has_logps] * len(item.token_ids))
        tail = _unsampled_turn_end(render.encode(render.turn_end(history)), item.token_ids)
        ids.extend(tail)
        mask.extend([False] * len(tail))
        _extend_zeros(logps, len(tail))
        known.extend([False] * len(tail))
        history.append(choice_as_message(item))
        rendered = render.text(history, add_generation_prompt=False)

    # The first token has no context to be predicted from.
    mask[0] = known[0] = False
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"trajectory is {len(ids)} tokens long, more than the model's {max_length} positions"
        )
    return TokenizedTrajectory(ids, mask, logps, known)


def _as_float32(values: Sequence[float]) -> array:
    """A decoded choice's ``array("f")`` as it is (extending by it copies its bytes); anything else converted."""
    return values if isinstance(values, array) and values.typecode == "f" else array("f", values)


def _extend_zeros(values: array, n: int) -> None:
    values.frombytes(bytes(values.itemsize * n))  # n zeros: 0.0 is all zero bits


class _Renderer:
    """The chat template, called the same way every time (tools passed when there are any)."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None) -> None:
        self.tokenizer = tokenizer
        self.kwargs: dict[str, Any] = {"tools": tools} if tools else {}

    def text(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.kwargs
            )
        except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:
            # The template runs over the job's messages: what it fails on is the job's input.
            raise ValueError(
                f"messages_and_choices: the chat template could not render the messages: {type(exc).__name__}: {exc}"
            ) from exc

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def turn_end(self, history: list[dict[str, Any]]) -> str:
        """What the template writes after an assistant message's content."""
        probe = history + [{"role": "assistant", "content": _SENTINEL}]
        text = self.text(probe, add_generation_prompt=False)
        if _SENTINEL not in text:
            return ""
        return text.rsplit(_SENTINEL, 1)[1]


def _after(rendered: str, prompt: str, index: int) -> str:
    """The part of ``prompt`` after the already emitted ``rendered`` history."""
    if not prompt.startswith(rendered):
        raise ValueError(
            f"messages_and_choices[{index}]: the chat template renders earlier turns differently "
            "once later messages are added (e.g. it drops reasoning from history); such "
            "multi-turn trajectories cannot be trained as one sequence"
        )
    return prompt[len(rendered) :]


def _unsampled_turn_end(turn_end: list[int], sampled: list[int]) -> list[int]:
    """The tokens of ``turn_end`` that the sampled tokens do not already end with.

    Compared in token space so a partial special token can never count as emitted.
    """
    for overlap in range(min(len(turn_end), len(sampled)), 0, -1):
        if sampled[-overlap:] == turn_end[:overlap]:
            return turn_end[overlap:]
    return turn_end


def _check_choice(choice: Choice, index: int, vocab_size: int | None, allow_missing_logprobs: bool) -> None:
    at = f"messages_and_choices[{index}]"
    if not choice.token_ids:
        raise ValueError(f"{at}.token_ids: a sampled turn needs at least one token")
    bad = [t for t in choice.token_ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"{at}.token_ids: token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    if not choice.logprobs:
        if not allow_missing_logprobs:
            raise ValueError(
                f"{at}.logprobs: missing (pass allow_training_without_logprobs=True to train without them)"
            )
    elif len(choice.logprobs) != len(choice.token_ids):
        raise ValueError(f"{at}.logprobs: {len(choice.logprobs)} logprobs for {len(choice.token_ids)} token_ids")
