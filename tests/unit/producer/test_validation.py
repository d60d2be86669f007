"""``validate_groups`` and ``encode_groups``: what the producer refuses before sending, and the worker again after decoding."""

from __future__ import annotations

import struct

import pytest

from producer.types import Choice, TrajectoryGroup
from producer.validation import encode_groups, validate_groups
from tests.support.groups import make_groups


def first_trajectory_items(groups: list[TrajectoryGroup]) -> list:
    return groups[0].trajectories[0].messages_and_choices


def test_the_test_groups_are_valid() -> None:
    validate_groups(make_groups(2))


def with_logprob(logprob: float, form: str) -> list[TrajectoryGroup]:
    """Test groups with one logprob replaced, the choice holding a float list or decoded float32."""
    groups = make_groups(1, n_trajectories=2, n_tokens=3)
    choice = groups[0].trajectories[1].messages_and_choices[-1]
    choice.logprobs[1] = logprob
    if form == "decoded":  # as the worker holds it: an array("f") from the packed bytes
        choice.logprobs = Choice(token_ids=[1, 2, 3], logprobs=struct.pack("<3f", *choice.logprobs)).logprobs
    return groups


# The ways in: validate_groups on a rollout's float lists, on what the worker decoded,
# and encode_groups, which checks the values on the bytes it packs.
CHECKS = {
    "list": lambda groups: validate_groups(groups),
    "decoded": lambda groups: validate_groups(groups),
    "encode": lambda groups: encode_groups(groups),
}


@pytest.mark.parametrize("form", CHECKS)
@pytest.mark.parametrize("logprob", [float("nan"), -float("nan"), float("-inf"), float("inf"), 0.5, 1e-40, 1e-50])
def test_a_logprob_that_is_not_a_log_probability_is_refused(logprob: float, form: str) -> None:
    if form == "decoded" and logprob == 1e-50:
        pytest.skip("float32 has no such value: it packs to +0.0, a valid logprob")
    groups = with_logprob(logprob, "decoded" if form == "decoded" else "list")

    with pytest.raises(ValueError, match=r"groups\[0\]\.trajectories\[1\]\.messages_and_choices\[2\]\.logprobs: every logprob"):
        CHECKS[form](groups)


@pytest.mark.parametrize("form", CHECKS)
@pytest.mark.parametrize("logprob", [0.0, -0.0, -1e-45, -3e38, -2e38])
def test_zero_tiny_and_huge_negative_logprobs_are_accepted(logprob: float, form: str) -> None:
    # +0.0 and values beyond -1.7e38 miss the packed bytes' quick test: the exact one takes them.
    CHECKS[form](with_logprob(logprob, "decoded" if form == "decoded" else "list"))


@pytest.mark.parametrize("content", [{"role": "user"}, float("nan"), 3, ["text"]])
def test_message_content_a_template_cannot_render_is_refused_naming_it(content: object) -> None:
    groups = make_groups(1, n_trajectories=1)
    first_trajectory_items(groups)[0]["content"] = content

    with pytest.raises(ValueError, match=r"messages_and_choices\[0\]\.content: must be a string, a list of content part dicts or None, got "):
        validate_groups(groups)


@pytest.mark.parametrize("content", [None, "", [{"type": "text", "text": "hi"}]])
def test_text_none_and_content_parts_are_accepted(content: object) -> None:
    groups = make_groups(1, n_trajectories=1)
    first_trajectory_items(groups)[1]["content"] = content

    validate_groups(groups)


def test_the_quick_test_on_packed_bytes_answers_for_ordinary_logprobs() -> None:
    from producer._float32 import all_negative as _float32_all_negative

    assert _float32_all_negative(struct.pack("<4f", -0.5, -1e-45, -0.0, -1e38))  # the usual case: no fallback
    for odd in (0.0, 0.5, float("nan"), -float("nan"), float("-inf"), -3e38):
        assert not _float32_all_negative(struct.pack("<2f", -1.0, odd)), odd  # looked at closer
