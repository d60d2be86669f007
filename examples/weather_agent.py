"""A tool-using agent, written as OpenPipe ART code: only its import lines name trainq.

The agent answers "what's the weather in X?" by calling a ``get_weather`` tool
and reporting what it returned; the weather is made up for each question, so
only an answer taken from the tool can be right. Two worked exchanges in the
prompt show the tool-call format; RL makes the small model use it reliably and
report the tool's answer.

    reward = 0.4 if the first call asks get_weather for the asked city
           + 0.6 if the final answer gives the temperature the tool returned

    python examples/weather_agent.py --steps 10       # the embedded default, local stack
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
from dataclasses import dataclass

import openai

import producer.art as art  # ART: import art
from producer.art.local import LocalBackend  # ART: from art.local import LocalBackend

BASE_MODEL = "trainq/smollm2-135m-instruct"
CITIES = [
    "Paris", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Hanoi", "Perth", "Dakar", "Turin", "Kyoto",
    "Bergen", "Porto", "Dublin", "Austin", "Nairobi", "Seoul", "Havana", "Malaga",
]
GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Today's weather in a city: temperature in Celsius and the sky.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name."}},
            "required": ["city"],
        },
    },
}
SYSTEM = "You answer questions about the weather. Always call get_weather first, then answer in one sentence."
MAX_TURNS = 3


def weather(city: str, day: int) -> tuple[int, str]:
    """The made-up weather of ``city`` on ``day``: the same for every rollout of a group."""
    digest = hashlib.sha256(f"{city.strip().lower()}:{day}".encode()).digest()
    return digest[0] % 35 - 5, ("sunny", "cloudy", "rainy", "windy", "snowy")[digest[1] % 5]


def worked_exchange(index: int, city: str) -> art.Messages:
    """A question, the tool call, the tool's answer and the final answer: the format to follow."""
    celsius, sky = weather(city, day=-1 - index)
    call_id = f"call-example-{index}"
    return [
        {"role": "user", "content": f"What's the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}},
        ]},
        {"role": "tool", "tool_call_id": call_id, "content": f"{celsius} C, {sky}"},
        {"role": "assistant", "content": f"It is {celsius} degrees and {sky} in {city}."},
    ]


@dataclass(frozen=True)
class Scenario:
    city: str
    day: int


def run_tool(call: object, day: int) -> str:
    """``get_weather``'s answer to a tool call, or an error the agent reads as the tool's answer."""
    function = getattr(call, "function", None)
    if getattr(function, "name", None) != "get_weather":
        return f"error: no tool named {getattr(function, 'name', None)!r}"
    try:
        city = json.loads(function.arguments).get("city", "")  # type: ignore[union-attr]
    except (ValueError, AttributeError):
        return "error: the arguments are not a JSON object with a city"
    celsius, sky = weather(str(city), day)
    return f"{celsius} C, {sky}"


@art.retry(exceptions=(openai.APIConnectionError,))
async def rollout(model: art.TrainableModel, scenario: Scenario) -> art.Trajectory:
    client = model.openai_client()
    trajectory = art.Trajectory(
        messages_and_choices=[
            {"role": "system", "content": SYSTEM},
            *worked_exchange(0, "Madrid"),
            *worked_exchange(1, "Boston"),
            {"role": "user", "content": f"What's the weather in {scenario.city}?"},
        ],
        tools=[GET_WEATHER],
        metadata={"city": scenario.city, "day": scenario.day},
    )
    first_call = None
    for _ in range(MAX_TURNS):
        completion = await client.chat.completions.create(
            model=model.get_inference_name(), messages=trajectory.messages(), tools=trajectory.tools,
            max_tokens=48, temperature=1.0,
        )
        choice = completion.choices[0]
        trajectory.messages_and_choices.append(choice)
        if not choice.message.tool_calls:
            break
        for call in choice.message.tool_calls:
            first_call = first_call or call
            trajectory.messages_and_choices.append(
                {"role": "tool", "tool_call_id": call.id, "content": run_tool(call, scenario.day)}
            )
    score(trajectory, scenario, first_call)
    return trajectory.finish()


def score(trajectory: art.Trajectory, scenario: Scenario, first_call: object) -> None:
    """Set the reward and the metrics of a finished conversation (see the module docstring)."""
    arguments = getattr(getattr(first_call, "function", None), "arguments", "") or ""
    right_city = f'"{scenario.city.lower()}"' in arguments.lower()
    final = trajectory.messages()[-1]
    answer = (final.get("content") or "") if not final.get("tool_calls") else ""
    celsius, _ = weather(scenario.city, scenario.day)
    right_answer = right_city and str(celsius) in re.findall(r"-?\d+", answer)
    trajectory.reward = 0.4 * right_city + 0.6 * right_answer
    trajectory.metrics["called_tool"] = first_call is not None
    trajectory.metrics["right_city"] = right_city
    trajectory.metrics["right_answer"] = right_answer
    trajectory.metrics["turns"] = len(trajectory.choices())


async def main(steps: int, groups_per_step: int, group_size: int, learning_rate: float, seed: int,
               path: str = ".trainq") -> None:
    backend = LocalBackend(path=path)
    model = art.TrainableModel(name="agent-001", project="weather-agent", base_model=BASE_MODEL)
    await model.register(backend)
    rng = random.Random(seed)
    try:
        for step in range(await model.get_step(), steps):
            scenarios = [Scenario(city, step) for city in rng.sample(CITIES, groups_per_step)]
            groups = await art.gather_trajectory_groups(
                (art.TrajectoryGroup(rollout(model, scenario) for _ in range(group_size)) for scenario in scenarios),
                pbar_desc=f"gather {model.get_inference_name()}",
                max_exceptions=0.1,
            )
            result = await backend.train(model, groups, learning_rate=learning_rate)
            logged = await model.log(groups, metrics=result.metrics, step=result.step, split="train")
            print(f"step {step}: reward {logged['reward']:.3f}  right city {logged['right_city']:.2f}  "
                  f"right answer {logged['right_answer']:.2f}", flush=True)
    finally:
        await backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--groups-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", default=".trainq", help="the local stack's folder")
    asyncio.run(main(**{k.replace("-", "_"): v for k, v in vars(parser.parse_args()).items()}))
