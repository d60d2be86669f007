"""The SDK's surface: what it exports, and what it refuses before any I/O."""

from __future__ import annotations

import sys
import typing

import msgspec
import pytest

import producer
from producer import QueueBackend, TrainableModel, TrainConfig
from producer.backend import TrainOptions
from producer.jobs import JobRecord
from producer.types import JobStatus


def test_all_lists_the_public_names() -> None:
    assert sorted(producer.__all__) == sorted(
        [
            "Backend", "BackendUnavailableError", "Choice", "ChoiceMessage", "ExceptionInfo", "JobCancelledError",
            "JobError", "JobFailedError", "JobNotFoundError", "JobRecord", "JobStatus", "LocalBackend",
            "LocalTrainResult", "Model", "NoWorkerError", "PayloadTooLargeError", "QueueBackend", "QueueTrainResult", "TrainConfig",
            "TrainJob", "TrainOptions", "TrainResult", "TrainTimeoutError", "TrainableModel", "TrainqError",
            "Trajectory", "TrajectoryGroup", "gather_trajectories", "gather_trajectory_groups",
        ]
    )
    for name in producer.__all__:
        assert hasattr(producer, name), name


def test_importing_the_sdk_imports_no_gpu_package() -> None:
    assert not {"torch", "transformers", "vllm"} & set(sys.modules) or "producer" in sys.modules
    import subprocess

    code = "import producer, sys; print(sorted({'torch','transformers','vllm','peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_keywords_are_exactly_the_config_fields_and_arts_no_op_keywords() -> None:
    from producer.backend import ART_NO_OP_KEYWORDS

    assert set(typing.get_type_hints(TrainOptions)) == set(TrainConfig.__struct_fields__) | set(ART_NO_OP_KEYWORDS)


async def test_unknown_keyword_is_a_type_error_before_any_io() -> None:
    backend = QueueBackend("redis://127.0.0.1:1/0")  # nothing listens there
    model = TrainableModel("m", "p", base_model="b")
    with pytest.raises(TypeError, match="lerning_rate"):
        await backend.submit_train(model, [], lerning_rate=1.0)
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        await backend.submit_train(model, [], learning_rate=-1.0)
    await backend.close()


@pytest.mark.parametrize("bad", ["", ".", "..", ".x", "a/b", "a b", "é", "x" * 65, "a:b"])
def test_bad_names_are_value_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        TrainableModel(bad, "p", base_model="b")
    with pytest.raises(ValueError):
        TrainableModel("m", bad, base_model="b")


def test_inference_name_is_always_name_at_step() -> None:
    model = TrainableModel("agent-1", "proj", base_model="b")
    assert model.get_inference_name() == "agent-1@0"
    model._set_step(3)
    assert model.get_inference_name() == "agent-1@3"
    assert model.get_inference_name(step=1) == "agent-1@1"


def test_job_record_decodes_a_redis_hash() -> None:
    from producer.types import JobOutcome

    record = JobRecord.from_hash(
        "abc",
        {b"status": b"succeeded", b"submitted_at": b"10.0", b"started_at": b"10.5", b"attempts": b"1",
         b"result": msgspec.msgpack.encode(JobOutcome(step=4, metrics={"loss": 0.5}, train_s=2.0)),
         b"worker": b"trainer@x"},
    )
    assert record.status is JobStatus.SUCCEEDED
    result = record.to_result()
    assert (result.step, result.queued_s, result.train_s, result.metrics) == (4, 0.5, 2.0, {"loss": 0.5})
