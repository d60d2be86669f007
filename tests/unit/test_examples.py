"""The examples' environments: what the model is rewarded for (their loops run in tests/e2e and the demo)."""

from __future__ import annotations

import itertools
import re

import pytest

from tests.support.examples import load_example

yes_no_maybe = load_example("yes_no_maybe")
guess_number = load_example("guess_number")


@pytest.mark.parametrize(
    ("text", "reward"),
    [("yes", 1.0), ("Yes.", 1.0), (" no!", 0.5), ("Maybe", 0.25), ("yes, maybe", 0.0), ("", 0.0), (None, 0.0)],
)
def test_yes_no_maybe_rewards_the_one_word_answers(text: str | None, reward: float) -> None:
    assert yes_no_maybe.reward_for(text) == reward


def test_yes_no_maybe_prompts_put_every_option_in_every_position() -> None:
    prompts = yes_no_maybe.build_prompts()
    assert len(prompts) == len(set(prompts)) == 24
    orders = {tuple(re.findall(r"\b(yes|no|maybe)\b", p)) for p in prompts}
    assert orders == set(itertools.permutations(["yes", "no", "maybe"]))


@pytest.mark.parametrize(("text", "guess"), [("50", 50), ("I guess 42.", 42), ("-3", -3), ("higher", None), (None, None)])
def test_guess_number_reads_the_first_number(text: str | None, guess: int | None) -> None:
    assert guess_number.parse_guess(text) == guess


def test_guess_number_rewards_finding_it_early_then_getting_close() -> None:
    score = guess_number.score
    assert score(37, [37]) == pytest.approx(0.98)
    assert score(37, [50, 25, 37]) == pytest.approx(0.94)
    assert score(37, [50, 40]) == pytest.approx(0.5 * (1 - 3 / 100) - 0.04)  # closest guess counts
    assert score(37, [50, 40]) > score(37, [90, 80])
    assert score(37, [50, None]) == 0.0  # a turn without a number ends the game with nothing
    assert score(37, []) == 0.0


def test_guess_number_prompt_shows_a_worked_game_of_plain_numbers() -> None:
    answers = [m["content"] for m in guess_number.WORKED_GAME if m["role"] == "assistant"]
    assert answers and all(guess_number.parse_guess(a) is not None for a in answers)
    assert guess_number.WORKED_GAME[-1]["role"] == "user"  # the real game's first guess is the model's


weather_agent = load_example("weather_agent")


def tool_call(name: str, arguments: str) -> object:
    from openai.types.chat import ChatCompletionMessageFunctionToolCall

    return ChatCompletionMessageFunctionToolCall.model_validate(
        {"id": "call-1", "type": "function", "function": {"name": name, "arguments": arguments}})


def test_weather_agent_tool_answers_from_the_made_up_weather_and_names_bad_calls() -> None:
    celsius, sky = weather_agent.weather("Lima", 3)
    assert weather_agent.weather(" lima ", 3) == (celsius, sky) and -5 <= celsius < 30
    assert weather_agent.run_tool(tool_call("get_weather", '{"city": "Lima"}'), 3) == f"{celsius} C, {sky}"
    assert weather_agent.run_tool(tool_call("get_time", "{}"), 3) == "error: no tool named 'get_time'"
    assert weather_agent.run_tool(tool_call("get_weather", "not json"), 3).startswith("error: the arguments")


@pytest.mark.parametrize(("arguments", "answer", "reward"), [
    ('{"city": "Lima"}', "It is {c} degrees and cloudy in Lima.", 1.0),
    ('{"city": "Lima"}', "It is 99 degrees in Lima.", 0.4),
    ('{"city": "Paris"}', "It is {c} degrees in Lima.", 0.0),  # a right number without the right call is luck
    (None, "It is {c} degrees in Lima.", 0.0),
])
def test_weather_agent_rewards_the_right_call_then_the_tools_temperature(arguments, answer, reward) -> None:
    import producer.art as art

    scenario = weather_agent.Scenario("Lima", 3)
    celsius, _ = weather_agent.weather("Lima", 3)
    trajectory = art.Trajectory([{"role": "user", "content": "What's the weather in Lima?"},
                                 {"role": "assistant", "content": answer.format(c=celsius)}])
    weather_agent.score(trajectory, scenario, tool_call("get_weather", arguments) if arguments else None)
    assert trajectory.reward == pytest.approx(reward)
    assert trajectory.metrics["called_tool"] == (arguments is not None)
