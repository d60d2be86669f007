"""backend.train through Redis and a real Celery worker process to a LoRA step on disk."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from producer import QueueBackend, TrainableModel
from tests.support.groups import make_groups
from tests.support.services import WorkerProcess

pytestmark = pytest.mark.slow


def _checkpoint(worker: WorkerProcess, model: TrainableModel, step: int) -> Path:
    return worker.checkpoint_root / model.project / model.name / "checkpoints" / f"{step:04d}"


def _logits(base_model: str, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 42, 99, 7]])).logits


async def test_train_returns_step_1_with_a_loadable_adapter_that_changed(
    backend: QueueBackend, model: TrainableModel, worker: WorkerProcess
) -> None:
    assert model.get_inference_name() == f"{model.name}@0"

    result = await backend.train(model, make_groups(2), learning_rate=1e-2)

    assert result.step == 1
    assert result.checkpoint_path == str(_checkpoint(worker, model, 1))
    assert model.get_inference_name() == f"{model.name}@1"
    assert await model.get_step() == 1
    for name in ("loss", "num_groups_submitted", "num_groups_trainable", "num_trajectories", "num_tokens",
                 "grad_norm", "learning_rate", "staleness_mean"):
        assert name in result.metrics, name
    assert result.metrics["num_groups_trainable"] == 2
    assert result.queued_s >= 0 and result.train_s > 0
    step0, step1 = (_logits(worker.base_model, _checkpoint(worker, model, s)) for s in (0, 1))
    assert not torch.allclose(step0, step1)


async def test_checkpoint_event_is_on_the_stream(backend: QueueBackend, model: TrainableModel) -> None:
    import redis.asyncio as aioredis

    from producer import keys

    result = await backend.train(model, make_groups(1), learning_rate=1e-3)
    client = aioredis.Redis.from_url(backend.redis_url)
    entries = await client.xrange(keys.CHECKPOINT_STREAM)
    await client.aclose()
    fields = [{k.decode(): v.decode() for k, v in e.items()} for _, e in entries]
    mine = [f for f in fields if f["model"] == model.name]
    assert [(f["kind"], int(f["step"])) for f in mine] == [("saved", 0), ("saved", 1)]
    assert mine[1]["job_id"] == result.job_id
    assert Path(mine[1]["path"]).is_dir()


async def test_deprecated_train_warns_once_and_still_trains_and_logs(
    backend: QueueBackend, model: TrainableModel
) -> None:
    with pytest.warns(DeprecationWarning, match="backend.train") as caught:
        await model.train(make_groups(2))
    assert len([w for w in caught if w.category is DeprecationWarning]) == 1
    assert caught[0].filename == __file__  # stacklevel points at the caller
    assert await model.get_step() == 1
    lines = [json.loads(line) for line in (model.model_dir / "history.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 1
    assert "train/loss" in lines[-1] and "train/reward" in lines[-1]
    assert (model.model_dir / "trajectories" / "train" / "0001.jsonl").exists()


async def test_log_writes_train_prefixed_metrics(backend: QueueBackend, model: TrainableModel) -> None:
    groups = make_groups(2)
    result = await backend.train(model, groups)
    await model.log(groups, metrics=result.metrics, step=result.step, split="train")
    line = json.loads((model.model_dir / "history.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 1 and "recorded_at" in line
    assert line["train/loss"] == pytest.approx(result.metrics["loss"])
    assert not any(key for key in line if key not in ("step", "recorded_at") and not key.startswith("train/"))


async def test_metrics_endpoint_shows_jobs_and_step(backend: QueueBackend, model: TrainableModel,
                                                    worker: WorkerProcess) -> None:
    await backend.train(model, make_groups(1))
    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    label = f"{model.project}/{model.name}"
    assert samples[("trainq_jobs_total", (("kind", "train"), ("model", label), ("status", "succeeded")))] == 1
    assert samples[("trainq_step", (("model", label),))] == 1
    assert any(name == "trainq_queue_depth" for name, _ in samples)
    assert samples[("trainq_train_duration_seconds_count", (("model", label),))] == 1
