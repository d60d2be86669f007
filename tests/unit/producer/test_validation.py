"""``validate_groups``: what the producer refuses before sending, and the worker again after decoding."""

from __future__ import annotations

import pytest

from producer.types import TrajectoryGroup, validate_groups
from tests.support.groups import make_groups


def first_trajectory_items(groups: list[TrajectoryGroup]) -> list:
    return groups[0].trajectories[0].messages_and_choices


def test_the_test_groups_are_valid() -> None:
    validate_groups(make_groups(2))


@pytest.mark.parametrize("logprob", [float("nan"), float("-inf"), 0.5])
def test_a_logprob_that_is_not_a_log_probability_is_refused(logprob: float) -> None:
    groups = make_groups(1, n_trajectories=2, n_tokens=3)
    groups[0].trajectories[1].messages_and_choices[-1].logprobs[0] = logprob

    with pytest.raises(ValueError, match=r"groups\[0\]\.trajectories\[1\]\.messages_and_choices\[2\]\.logprobs"):
        validate_groups(groups)


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
