"""The core types take the forms ART code builds, and refuse what trainq does not do by naming it."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from openai.types.chat import ChatCompletion

from producer import (
    Choice,
    LocalTrainResult,
    Model,
    QueueBackend,
    QueueTrainResult,
    TrainableModel,
    TrainConfig,
    Trajectory,
    TrajectoryGroup,
    gather_trajectories,
    gather_trajectory_groups,
)
from producer.history import read_history
from producer.validation import encode_groups
from trainer_worker.jobs import decode_groups

PROMPT_IDS = [1, 9690, 198, 4093, 198, 36218, 2, 198, 1, 520, 9531, 198]


def completion(*, logprobs: bool = True, token_ids: bool = True, sampler: bool = True, tool_call: bool = False,
               model: str = "agent@4", temperature: float = 0.7) -> ChatCompletion:
    """A chat completion as trainq's inference worker returns it when the request asked for nothing."""
    choice: dict = {
        "index": 0,
        "message": {"role": "assistant", "content": None if tool_call else "yes"},
        "finish_reason": "tool_calls" if tool_call else "stop",
        "logprobs": {"content": [
            {"token": f"token_id:{t}", "logprob": lp, "bytes": [], "top_logprobs": []}
            for t, lp in ((10539, -2.5), (2, -0.25))
        ]} if logprobs else None,
    }
    if tool_call:
        choice["message"]["tool_calls"] = [
            {"id": "call-1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}
        ]
    if token_ids:
        choice["token_ids"] = [10539, 2]
    if sampler:
        choice["trainq_sampler"] = {"model": model, "temperature": temperature, "prompt_token_ids": PROMPT_IDS}
    return ChatCompletion.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model, "choices": [choice],
        **({"prompt_token_ids": PROMPT_IDS} if token_ids else {}),
    })


MESSAGES = [{"role": "user", "content": "Say yes"}]


# ---------------------------------------------------------------- raw choices


def test_a_bare_openai_choice_in_a_trajectory_becomes_a_choice_with_what_the_sampler_saw() -> None:
    trajectory = Trajectory(messages_and_choices=[*MESSAGES, completion().choices[0]], reward=1.0)

    [choice] = trajectory.choices()
    assert (choice.token_ids, list(choice.logprobs)) == ([10539, 2], [-2.5, -0.25])
    assert choice.prompt_token_ids == PROMPT_IDS and choice.temperature == 0.7 and choice.sampled_step == 4
    assert choice.message.content == "yes" and choice.finish_reason == "stop"


async def test_a_choice_appended_after_construction_is_converted_when_encoded_and_logged(tmp_path) -> None:
    trajectory = Trajectory(messages_and_choices=list(MESSAGES), reward=1.0)
    trajectory.messages_and_choices.append(completion(tool_call=True).choices[0])
    groups = [TrajectoryGroup([trajectory, Trajectory([*MESSAGES, completion().choices[0]], reward=0.0)])]

    decoded = decode_groups(encode_groups(groups))
    [choice] = decoded[0].trajectories[0].choices()
    assert choice.message.tool_calls[0]["function"]["name"] == "add"

    lines = await log_and_read(tmp_path, groups)
    assert lines[0]["messages"][-1]["tool_calls"][0]["function"]["arguments"] == "{\"a\": 2}"


def test_a_choice_without_logprobs_gets_an_error_naming_the_trajectory_and_the_fix() -> None:
    groups = [TrajectoryGroup([Trajectory([*MESSAGES, completion(logprobs=False).choices[0]], reward=1.0)])]

    with pytest.raises(ValueError, match=r"groups\[0\]\.trajectories\[0\]\.messages_and_choices\[1\]\.logprobs: "
                                         r"the sampler returned none .*allow_training_without_logprobs=True"):
        encode_groups(groups)
    encode_groups(groups, allow_missing_logprobs=True)  # the sampled token ids are still there


def test_a_choice_without_token_ids_names_where_it_is_and_how_to_get_them() -> None:
    raw = completion(logprobs=False, token_ids=False, sampler=False).choices[0]
    groups = [TrajectoryGroup([Trajectory([*MESSAGES, raw], reward=1.0)])]

    with pytest.raises(ValueError, match=r"messages_and_choices\[1\]: the openai choice cannot be trained on: "
                                         r"the choice carries no token ids.*return_token_ids"):
        encode_groups(groups, allow_missing_logprobs=True)


def test_from_openai_reads_a_whole_completion_and_takes_the_temperature_given() -> None:
    choice = Choice.from_openai(completion(sampler=False), temperature=0.5)

    assert (choice.prompt_token_ids, choice.temperature, choice.sampled_step) == (PROMPT_IDS, 0.5, 4)
    with pytest.raises(ValueError, match="no logprobs"):
        Choice.from_openai(completion(logprobs=False))


async def test_a_choice_built_with_a_message_dict_trains_and_logs(tmp_path) -> None:
    choice = Choice(token_ids=[5, 6], logprobs=[-1.0, -0.5], message={"role": "assistant", "content": "yes"})
    groups = [TrajectoryGroup([Trajectory([*MESSAGES, choice], reward=1.0)])]

    encode_groups(groups)
    assert (await log_and_read(tmp_path, groups))[0]["messages"][-1]["content"] == "yes"


# ------------------------------------------------------------------- groups


async def rollout(reward: float, delay: float = 0.0) -> Trajectory:
    await asyncio.sleep(delay)
    return Trajectory(messages_and_choices=[*MESSAGES, completion().choices[0]], reward=reward)


async def test_a_group_of_coroutines_is_awaited_by_gather_and_iterates_over_its_trajectories() -> None:
    groups = await gather_trajectory_groups(
        [TrajectoryGroup([rollout(1.0), rollout(0.5, 0.01)]), TrajectoryGroup(rollout(r) for r in (0.0, 0.25, 1.0))],
        pbar_desc=None,
    )

    assert [[t.reward for t in group] for group in groups] == [[1.0, 0.5], [0.0, 0.25, 1.0]]
    assert [len(group) for group in groups] == [2, 3]


async def test_a_group_of_coroutines_can_be_awaited_alone_and_keeps_its_metadata() -> None:
    group = TrajectoryGroup([rollout(1.0), rollout(0.0)], metadata={"scenario": 3})

    assert await group is group
    assert [t.reward for t in group] == [1.0, 0.0] and group.metadata == {"scenario": 3} and not group.pending


async def test_exceptions_in_a_group_are_recorded_within_the_budget() -> None:
    async def failing() -> Trajectory:
        raise RuntimeError("the game crashed")

    [group] = await gather_trajectory_groups([TrajectoryGroup([rollout(1.0), failing()])], pbar_desc=None,
                                             max_exceptions=1)

    assert len(group) == 1 and [e.message for e in group.exceptions] == ["the game crashed"]
    built = TrajectoryGroup([Trajectory(reward=1.0), ValueError("bad")], exceptions=[KeyError("k")])
    assert len(built) == 1 and [e.type for e in built.exceptions] == ["KeyError", "ValueError"]


async def test_gather_trajectories_returns_rollouts_in_order_and_failures_as_exceptions() -> None:
    async def failing() -> Trajectory:
        raise RuntimeError("no")

    results = await gather_trajectories([rollout(1.0, 0.01), failing(), rollout(0.0)], pbar_desc=None,
                                        max_exceptions=1)

    assert results[0].reward == 1.0 and isinstance(results[1], RuntimeError) and results[2].reward == 0.0


async def test_a_group_not_yet_awaited_is_refused_by_name_before_anything_is_sent() -> None:
    group = TrajectoryGroup([rollout(1.0), rollout(0.0)])
    with pytest.raises(ValueError, match=r"groups\[0\]\.trajectories\[0\]: expected a Trajectory, got coroutine: "
                                         r"await the group"):
        encode_groups([group])
    await group  # no coroutine left un-awaited


# -------------------------------------------------------------- trajectories


async def test_int_and_bool_metrics_train_and_log_as_floats(tmp_path) -> None:
    trajectory = Trajectory(messages_and_choices=[*MESSAGES, completion().choices[0]], reward=1.0, metrics={"n": 3})
    trajectory.metrics["win"] = True
    other = Trajectory(messages_and_choices=[*MESSAGES, completion().choices[0]], reward=0.0)
    other.metrics["win"] = False
    groups = [TrajectoryGroup([trajectory, other])]

    assert decode_groups(encode_groups(groups))[0].trajectories[0].metrics == {"n": 3.0, "win": 1.0}
    await log_and_read(tmp_path, groups)
    assert read_history(tmp_path / "p" / "models" / "m")[-1]["train/win"] == 0.5


def test_messages_give_the_conversation_to_send_next() -> None:
    trajectory = Trajectory([*MESSAGES, completion(tool_call=True).choices[0],
                             {"role": "tool", "tool_call_id": "call-1", "content": "2"}])

    assert trajectory.messages() == [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call-1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "2"},
    ]


async def test_finish_and_track_duration_record_seconds() -> None:
    trajectory = Trajectory(reward=0.0)
    async with trajectory.track_duration("tool"):
        await asyncio.sleep(0.02)

    assert trajectory.finish() is trajectory
    assert trajectory.metrics["tool_duration"] >= 0.02 and trajectory.metrics["duration"] >= 0.02
    assert Trajectory().messages_and_choices == [] and Trajectory().reward == 0.0


# ------------------------------------------------------------------- config


@pytest.mark.parametrize("level", ["token", "sequence", "average", "geometric_average"])
def test_every_importance_sampling_level_of_art_is_accepted(level: str) -> None:
    assert TrainConfig(importance_sampling_level=level).importance_sampling_level == level


@pytest.mark.parametrize(("field", "value", "message"), [
    ("importance_sampling_level", "averge", "importance_sampling_level must be one of"),
    ("advantage_balance", 1.5, r"advantage_balance must be a number in \[-1, 1\]"),
    ("truncated_importance_sampling", 0.5, "truncated_importance_sampling must be None or a finite number >= 1"),
    ("ppo", "yes", "ppo must be True or False"),
    ("max_staleness", 1.5, "max_staleness must be None or an int >= 0"),
])
def test_a_bad_value_is_named_before_anything_is_queued(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


async def test_arts_train_keywords_are_taken_or_refused_by_name_before_any_io() -> None:
    backend = QueueBackend("redis://127.0.0.1:1/0")  # nothing listens there: every check is before I/O
    model = TrainableModel("m", "p", base_model="b")
    groups = [TrajectoryGroup([Trajectory([*MESSAGES, completion().choices[0]], reward=1.0)])]
    with pytest.raises(ValueError, match="save_checkpoint=False is not supported"):
        await backend.submit_train(model, groups, save_checkpoint=False)
    with pytest.raises(ValueError, match="kl_penalty_coef=0.1 is not supported by trainq; beta="):
        await backend.submit_train(model, groups, kl_penalty_coef=0.1)
    with pytest.raises(ValueError, match="logprob_calculation_chunk_size must be an int >= 1"):
        await backend.submit_train(model, groups, logprob_calculation_chunk_size=0)
    with pytest.raises(TypeError, match="kimi_k2"):
        await backend.submit_train(model, groups, kimi_k2=0.1)
    await backend.close()


def test_a_queue_result_is_a_local_train_result() -> None:
    result = QueueTrainResult(step=1, job_id="j", checkpoint_path="/c")
    assert isinstance(result, LocalTrainResult)
    assert msgspec.json.decode(msgspec.json.encode(result), type=QueueTrainResult) == result


# -------------------------------------------------------------------- models


async def test_a_model_trainq_does_not_train_registers_samples_under_its_name_and_is_at_step_0(tmp_path) -> None:
    backend = QueueBackend("redis://127.0.0.1:1/0", "http://127.0.0.1:1/v1", "key", path=str(tmp_path))
    model = Model(name="gpt-4o-mini", project="p", inference_model_name="openai/gpt-4o-mini",
                  inference_base_url="https://example.invalid/v1")
    plain = Model(name="base", project="p")

    await model.register(backend)
    await plain.register(backend)

    assert model.get_inference_name() == "openai/gpt-4o-mini" and plain.get_inference_name() == "base"
    assert await model.get_step() == 0
    assert model.inference_base_url == "https://example.invalid/v1", "a server of its own stays"
    assert plain.inference_base_url == "http://127.0.0.1:1/v1" and plain.base_path == str(tmp_path)
    client = plain.openai_client()
    assert plain.openai_client() is client, "one client per model, not one per call"
    await backend.close()
    assert client.is_closed(), "backend.close() closes the clients of the models registered with it"
    assert plain.openai_client() is not client, "a closed client is replaced"
    await plain.close()


def test_a_model_carries_a_config_and_is_generic_over_it() -> None:
    class Policy(msgspec.Struct):
        max_turns: int = 3

    model: TrainableModel[Policy] = TrainableModel[Policy]("m", "p", base_model="b", config=Policy())
    assert model.config.max_turns == 3


async def log_and_read(tmp_path, groups: list[TrajectoryGroup]) -> list[dict]:
    """``model.log`` the groups; the trajectory lines it wrote."""
    from producer.history import trajectories_path

    model = Model("m", "p", base_path=str(tmp_path))
    await model.log(groups, split="train", step=1)
    return [json.loads(line) for line in trajectories_path(model.model_dir, "train", 1).read_text().splitlines()]
