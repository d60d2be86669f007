"""The training group on CUDA (NCCL, bfloat16 base, float32 LoRA and AdamW) against one CUDA process.

Skipped without a GPU; CI has none. Run on a GPU box with ``pytest -m gpu``.
bfloat16 rounding moves a step's numbers by about a percent, so the checks are
loose where bfloat16 is, and tight where a mistake would show: a loss or a
gradient scaled by the number of ranks is off by a factor, not a percent.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.trainer.test_trainer_trainer import LR, groups, model_ref
from trainer_worker.core.trainer import Trainer
from trainer_worker.group.client import GroupTrainer
from trainer_worker.settings import TrainerSettings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(600),
]


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_cuda_group_steps_like_one_cuda_process(ranks: int, tiny_model: Path, tmp_path: Path) -> None:
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs")
    settings = TrainerSettings(base_model="tiny-llama", checkpoint_root=str(tmp_path / "group"), device="cuda",
                               nproc_per_node=ranks, max_tokens_per_microbatch=64, collective_timeout_s=120)
    group = GroupTrainer(settings, str(tiny_model), start_timeout_s=300)
    try:
        single = Trainer(str(tiny_model), str(tmp_path / "single"), device="cuda", max_tokens_per_microbatch=64)
        model = model_ref(f"cuda-{ranks}")
        for trainer in (group, single):
            trainer.register(model)
        for step in (1, 2):
            made = group.train(f"job-{step}", model, LR, groups(sampled_step=step - 1))
            expected = single.train(f"job-{step}", model, LR, groups(sampled_step=step - 1))
            assert made.step == expected.step == step
            assert all(math.isfinite(v) for v in made.metrics.values())
            assert made.metrics["num_ranks"] == ranks
            for metric in ("loss", "grad_norm"):
                assert made.metrics[metric] == pytest.approx(expected.metrics[metric], rel=0.05), metric
            weights = load_file(str(Path(made.checkpoint_path) / "adapter_model.safetensors"))
            assert {w.dtype for w in weights.values()} == {torch.float32}
            optimizer = torch.load(Path(made.checkpoint_path) / "optimizer.pt", weights_only=True)
            assert {float(s["step"]) for s in optimizer["state"].values()} == {float(step)}
            assert {s["exp_avg"].dtype for s in optimizer["state"].values()} == {torch.float32}
        assert group.restarts == 0
    finally:
        group.close()
