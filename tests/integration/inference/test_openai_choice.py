"""``Choice.from_openai`` on vLLM-shaped completions (no server: the objects are built here)."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletion

from producer.types import Choice


def completion(model: str = "agent@3", tokens: list[str] | None = None, with_logprobs: bool = True) -> ChatCompletion:
    tokens = ["token_id:343", "token_id:2"] if tokens is None else tokens
    logprobs = {"content": [{"token": t, "logprob": -0.5 * (i + 1), "bytes": [], "top_logprobs": []} for i, t in enumerate(tokens)]}
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "yes",
                        "tool_calls": [
                            {"id": "call-1", "type": "function", "function": {"name": "guess", "arguments": "{\"n\": 5}"}}
                        ],
                    },
                    "logprobs": logprobs if with_logprobs else None,
                    "finish_reason": "tool_calls",
                }
            ],
        }
    )


def test_a_completion_gives_token_ids_logprobs_message_and_the_step_of_its_model():
    choice = Choice.from_openai(completion())

    assert choice.token_ids == [343, 2]
    assert choice.logprobs == [-0.5, -1.0]
    assert choice.sampled_step == 3
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "yes"
    assert choice.message.tool_calls == [
        {"id": "call-1", "type": "function", "function": {"name": "guess", "arguments": "{\"n\": 5}"}}
    ]


def test_a_bare_choice_takes_its_step_from_the_inference_name_given():
    assert Choice.from_openai(completion().choices[0], "agent@12").sampled_step == 12
    assert Choice.from_openai(completion().choices[0]).sampled_step is None
    assert Choice.from_openai(completion(model="base-model")).sampled_step is None


def test_raw_json_dicts_work_too():
    choice = Choice.from_openai(completion().model_dump())
    assert (choice.token_ids, choice.sampled_step) == ([343, 2], 3)


def test_missing_logprobs_say_how_to_request_them():
    with pytest.raises(ValueError, match=r"logprobs=True and extra_body=\{'return_tokens_as_token_ids': True, 'return_token_ids': True\}"):
        Choice.from_openai(completion(with_logprobs=False))


def test_tokens_as_text_instead_of_ids_are_refused():
    with pytest.raises(ValueError, match="return_tokens_as_token_ids"):
        Choice.from_openai(completion(tokens=["yes"]))
