"""``producer.art``: ART's module layout over trainq's own classes, and what it refuses by name."""

from __future__ import annotations

import asyncio
import logging

import pytest

import producer
import producer.art as art
from producer.art import dev
from producer.art.local import LocalBackend
from producer.art.types import LocalTrainResult, Messages, MessagesAndChoices, Tools
from producer.art.utils import iterate_dataset, limit_concurrency


def test_arts_names_are_trainqs_own_classes() -> None:
    assert art.Trajectory is producer.Trajectory and art.TrajectoryGroup is producer.TrajectoryGroup
    assert art.TrainableModel is producer.TrainableModel and art.Model is producer.Model
    assert art.TrainConfig is producer.TrainConfig and LocalTrainResult is producer.LocalTrainResult
    assert LocalBackend is producer.LocalBackend and art.LocalBackend is LocalBackend
    assert art.gather_trajectory_groups is producer.gather_trajectory_groups
    assert art.retry is art.utils.retry and dev.TrainConfig is producer.TrainOptions
    assert all(alias is not None for alias in (Messages, MessagesAndChoices, Tools))  # evaluated at import time
    from producer.art.local.backend import LocalBackend as FromModule

    assert FromModule is LocalBackend


@pytest.mark.parametrize("name", ["ServerlessBackend", "SkyPilotBackend", "TinkerBackend", "nothing_of_art"])
def test_what_trainq_does_not_do_is_named_in_the_error(name: str) -> None:
    with pytest.raises(AttributeError, match=f"art.{name} is not"):
        getattr(art, name)


def test_in_process_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="in_process=True is not supported"):
        LocalBackend(in_process=True)
    assert LocalBackend(path=None).path == ".trainq"


def test_an_internal_config_warns_once_per_setting_with_what_to_set_instead() -> None:
    config = dev.InternalModelConfig(
        init_args=dev.InitArgs(max_seq_length=4096), peft_args=dev.PeftArgs(r=16),
        engine_args=dev.EngineArgs(gpu_memory_utilization=0.7),
    )
    with pytest.warns(UserWarning) as caught:
        model = art.TrainableModel(name="m1", project="p", base_model="b", _internal_config=config)
        model._internal_config = config  # ART's examples also set it afterwards: said once only
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "_internal_config engine_args.gpu_memory_utilization is ignored by trainq; set the inference worker's flags "
        "(--vllm-args passes any vLLM argument)",
        "_internal_config init_args.max_seq_length is ignored by trainq; set the inference worker's "
        "--max-model-len and the trainer's model limit",
        "_internal_config peft_args.r is ignored by trainq; set the trainer's LoRA shape (r=8, alpha=16, every "
        "projection), the same for every model",
    ]


async def test_retry_retries_the_named_exceptions_with_backoff_then_raises(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    @art.retry(max_attempts=3, delay=0.001, exceptions=(ConnectionError,))
    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("try again")
        return "ok"

    @art.retry(max_attempts=2, delay=0.001, exceptions=(ConnectionError,))
    def always_down() -> None:
        calls.append(2)
        raise ConnectionError("down")

    @art.retry(exceptions=(ConnectionError,))
    def wrong() -> None:
        calls.append(3)
        raise KeyError("not retried")

    with caplog.at_level(logging.WARNING):
        assert await flaky() == "ok"
    assert "retry 1/3 of flaky after ConnectionError: try again" in caplog.text
    with pytest.raises(ConnectionError, match="down"):
        always_down()
    with pytest.raises(KeyError):
        wrong()
    assert calls == [1, 1, 1, 2, 2, 3]


def test_iterate_dataset_covers_each_epoch_in_a_seeded_order_and_resumes_where_asked() -> None:
    items = list(range(10))
    batches = list(iterate_dataset(items, groups_per_step=4, num_epochs=2, use_tqdm=False))

    assert [(b.step, b.epoch, b.epoch_step) for b in batches] == [(0, 0, 0), (1, 0, 1), (2, 0, 2),
                                                                   (3, 1, 0), (4, 1, 1), (5, 1, 2)]
    assert sorted(x for b in batches[:3] for x in b.items) == items
    assert [b.items for b in batches[:3]] != [b.items for b in batches[3:]]
    resumed = list(iterate_dataset(items, groups_per_step=4, num_epochs=2, initial_step=4, use_tqdm=False))
    assert [b.items for b in resumed] == [b.items for b in batches[4:]]


async def test_limit_concurrency_holds_calls_to_the_limit() -> None:
    running = peak = 0

    @limit_concurrency(2)
    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    await asyncio.gather(*(work() for _ in range(6)))
    assert peak == 2
