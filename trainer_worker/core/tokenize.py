"""Turn a ``Trajectory`` into the token sequences to train on: exactly what the sampler saw and produced.

**From the sampler's tokens** (every sampled ``Choice`` carries the prompt
token ids of its request, as trainq's inference worker returns them): each
turn is its prompt ids, then its sampled ids. A turn whose prompt extends the
sequence so far (earlier prompt and sampled tokens, then the messages between)
continues it: the new prompt ids after that prefix become masked context.
A turn whose prompt does not (the chat template rendered an earlier turn
differently from what was sampled: a reasoning block dropped from history,
whitespace normalised, a tool call re-serialised) starts a sequence of its
own, so that no token is ever trained under a context the sampler did not see.

**Rendered** (a choice without prompt ids: another sampler, an older client):
the context (system, user, tool and plain assistant messages, and the
template's turn markers) is rendered with the base model's chat template, and
each choice's ``token_ids`` go in verbatim, never re-tokenized. The text
between turns is the part of the conversation rendered with
``add_generation_prompt=True`` after what the template rendered for the
conversation so far; where the template renders history differently once later
messages are added, the turn starts a sequence of its own, as above. The end of
an assistant turn the sampler did not emit itself (ChatML's ``<|im_end|>\\n``
after a choice that stopped on a stop string, or the ``\\n`` after a sampled
``<|im_end|>``) is masked context, found by rendering a sentinel message and
comparing in token space. Such sequences are marked ``sampler_context=False``:
their context is the template's, not known to be the sampler's.

Only sampled tokens are in ``assistant_mask``; each carries the temperature its
turn was sampled at, which the forward pass divides its logits by.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from producer.types import Choice, Trajectory, choice_as_message

__all__ = ["TokenizedTrajectory", "tokenize_trajectory"]

_SENTINEL = "\u2063TRAINQ-SENTINEL\u2063"


@dataclass(frozen=True)
class TokenizedTrajectory:
    """One token sequence to train. All per-token fields share the length of ``input_ids``.

    ``sampler_logprobs[i]`` is the sampler's log-probability of ``input_ids[i]``;
    it is meaningful only where ``logprobs_known[i]``, which implies
    ``assistant_mask[i]``. Elsewhere it is 0.0. It is an ``array("f")``: the
    logprobs arrive as float32 (``Choice``) and go to a float32 tensor
    (``packing``) without a Python float per token. ``temperatures[i]`` is the
    temperature token ``i`` was sampled at (1.0 off the mask).
    ``sampler_context``: the context of every trained token is the sampler's
    own prompt (not a re-rendering of the conversation).
    """

    input_ids: list[int]
    assistant_mask: list[bool]
    sampler_logprobs: array
    logprobs_known: list[bool]
    temperatures: array
    sampler_context: bool = True

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained_tokens(self) -> int:
        return sum(self.assistant_mask)


def tokenize_trajectory(
    trajectory: Trajectory,
    tokenizer: Any,
    *,
    vocab_size: int | None = None,
    max_length: int | None = None,
    allow_missing_logprobs: bool = False,
) -> list[TokenizedTrajectory]:
    """The sequences to train ``trajectory`` on: one, or one per run of turns whose contexts extend each other.

    Args:
        trajectory: messages and sampled choices, in conversation order. Items
            after the last choice are dropped: no trained token can see them.
        tokenizer: a transformers tokenizer with a chat template (for the
            rendered path; the sampler's path needs none).
        vocab_size: the model's embedding rows; a token id at or above it is a ``ValueError``.
        max_length: the model's position limit; a longer sequence is a ``ValueError``.
        allow_missing_logprobs: accept choices with empty ``logprobs`` (their
            tokens get ``logprobs_known=False``); otherwise that is a ``ValueError``.
    """
    items = trajectory.messages_and_choices
    last_choice = max((i for i, item in enumerate(items) if isinstance(item, Choice)), default=-1)
    if last_choice < 0:
        raise ValueError("messages_and_choices: no sampled Choice to train on")
    for index, item in enumerate(items[: last_choice + 1]):
        if isinstance(item, Choice):
            _check_choice(item, index, vocab_size, allow_missing_logprobs)
    items = items[: last_choice + 1]
    if all(item.prompt_token_ids for item in items if isinstance(item, Choice)):
        sequences = _from_sampler(items, vocab_size)
    else:
        sequences = _rendered(items, _Renderer(tokenizer, trajectory.tools))
    for sequence in sequences:
        if max_length is not None and len(sequence) > max_length:
            raise ValueError(f"trajectory is {len(sequence)} tokens long, more than the model's {max_length} positions")
    return sequences


# ----------------------------------------------------------- building blocks


@dataclass
class _Builder:
    """One sequence being built: context and sampled turns appended in order."""

    sampler_context: bool
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logps: array = field(default_factory=lambda: array("f"))
    known: list[bool] = field(default_factory=list)
    temperatures: array = field(default_factory=lambda: array("f"))

    def add_context(self, ids: Sequence[int]) -> None:
        self.ids.extend(ids)
        self.mask.extend([False] * len(ids))
        _extend_constant(self.logps, 0.0, len(ids))
        self.known.extend([False] * len(ids))
        _extend_constant(self.temperatures, 1.0, len(ids))

    def add_sampled(self, choice: Choice) -> None:
        n = len(choice.token_ids)
        self.ids.extend(choice.token_ids)
        self.mask.extend([True] * n)
        has_logps = bool(choice.logprobs)
        if has_logps:
            self.logps.extend(_as_float32(choice.logprobs))
        else:
            _extend_constant(self.logps, 0.0, n)
        self.known.extend([has_logps] * n)
        # Greedy decoding (0) samples from no distribution: vLLM then reports the untempered logprobs.
        _extend_constant(self.temperatures, choice.temperature or 1.0, n)

    def build(self) -> TokenizedTrajectory:
        # The first token has no context to be predicted from.
        self.mask[0] = self.known[0] = False
        return TokenizedTrajectory(self.ids, self.mask, self.logps, self.known, self.temperatures,
                                   self.sampler_context)


def _from_sampler(items: list[Any], vocab_size: int | None) -> list[TokenizedTrajectory]:
    sequences: list[TokenizedTrajectory] = []
    current: _Builder | None = None
    for index, item in enumerate(items):
        if not isinstance(item, Choice):
            continue  # the messages between turns are in the next turn's prompt ids
        prompt = item.prompt_token_ids or []
        _check_ids(prompt, f"messages_and_choices[{index}].prompt_token_ids", vocab_size)
        if current is not None and prompt[: len(current.ids)] == current.ids:
            current.add_context(prompt[len(current.ids):])
        else:
            if current is not None:
                sequences.append(current.build())
            current = _Builder(sampler_context=True)
            current.add_context(prompt)
        current.add_sampled(item)
    assert current is not None
    sequences.append(current.build())
    return sequences


def _rendered(items: list[Any], render: _Renderer) -> list[TokenizedTrajectory]:
    sequences: list[TokenizedTrajectory] = []
    current: _Builder | None = None
    history: list[dict[str, Any]] = []
    rendered = ""  # the template's text for ``history`` (without a generation prompt)
    diverged = False  # the template wrote the last sampled turn otherwise than it was sampled
    for item in items:
        if not isinstance(item, Choice):
            history.append(item)
            continue
        prompt = render.text(history, add_generation_prompt=True)
        if current is None or diverged or not prompt.startswith(rendered):
            # The template renders earlier turns differently now: this turn starts afresh.
            if current is not None:
                sequences.append(current.build())
            current, rendered = _Builder(sampler_context=False), ""
        current.add_context(render.encode(prompt[len(rendered):]))
        current.add_sampled(item)
        current.add_context(_unsampled_turn_end(render.encode(render.turn_end(history)), item.token_ids))
        history.append(choice_as_message(item))
        rendered = render.text(history, add_generation_prompt=False)
        diverged = not rendered.startswith(prompt + (item.message.content or ""))
    assert current is not None
    sequences.append(current.build())
    return sequences


def _as_float32(values: Sequence[float]) -> array:
    """A decoded choice's ``array("f")`` as it is (extending by it copies its bytes); anything else converted."""
    return values if isinstance(values, array) and values.typecode == "f" else array("f", values)


def _extend_constant(values: array, value: float, n: int) -> None:
    if value == 0.0:
        values.frombytes(bytes(values.itemsize * n))  # n zeros: 0.0 is all zero bits
    else:
        values.extend(array(values.typecode, [value]) * n)


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


def _unsampled_turn_end(turn_end: list[int], sampled: list[int]) -> list[int]:
    """The tokens of ``turn_end`` that the sampled tokens do not already end with.

    Compared in token space so a partial special token can never count as emitted.
    """
    for overlap in range(min(len(turn_end), len(sampled)), 0, -1):
        if sampled[-overlap:] == turn_end[:overlap]:
            return turn_end[overlap:]
    return turn_end


def _check_ids(ids: Sequence[int], at: str, vocab_size: int | None) -> None:
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"{at}: token id {bad[0]} is outside the model's vocabulary of {vocab_size}")


def _check_choice(choice: Choice, index: int, vocab_size: int | None, allow_missing_logprobs: bool) -> None:
    at = f"messages_and_choices[{index}]"
    if not choice.token_ids:
        raise ValueError(f"{at}.token_ids: a sampled turn needs at least one token")
    _check_ids(choice.token_ids, f"{at}.token_ids", vocab_size)
    if not choice.logprobs:
        if not allow_missing_logprobs:
            raise ValueError(
                f"{at}.logprobs: missing (pass allow_training_without_logprobs=True to train without them)"
            )
    elif len(choice.logprobs) != len(choice.token_ids):
        raise ValueError(f"{at}.logprobs: {len(choice.logprobs)} logprobs for {len(choice.token_ids)} token_ids")
