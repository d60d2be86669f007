"""The trainer on CUDA (bfloat16 base, float32 adapter) against the CPU trainer (float32).

Skipped without a GPU; CI has none. Run on a GPU box with ``pytest -m gpu``.
"""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.trainer.test_trainer_trainer import LR, groups, model_ref
from trainer_worker.core.batch import prepare_batch
from trainer_worker.core.forward import per_token_logps
from trainer_worker.core.packing import build_microbatches
from trainer_worker.core.tokenize import tokenize_trajectory
from trainer_worker.core.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def trainer_on(device, tiny_model, root):
    return Trainer(str(tiny_model), str(root), device=device, max_tokens_per_microbatch=128, seed=0)


def logps_of(trainer, device):
    """Per-token log-probs of the test groups under the trainer's resident model (adapter at step 0)."""
    batch = prepare_batch(groups(), 0, LR, lambda t: tokenize_trajectory(t, trainer.tokenizer))
    (micro,) = build_microbatches(batch.sequences, 1024)
    with torch.no_grad():
        return per_token_logps(trainer._loaded.model, micro, device).float().cpu(), micro.loss_mask


def test_step_zero_adapter_is_the_same_on_every_device(tiny_model, tmp_path):
    cpu = trainer_on("cpu", tiny_model, tmp_path / "cpu")._loaded.initial_adapter
    cuda = trainer_on("cuda", tiny_model, tmp_path / "cuda")._loaded.initial_adapter
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        assert cuda[key].dtype == torch.float32, key
        # The same draws; peft passes them through the bfloat16 base's dtype before keeping them in float32.
        torch.testing.assert_close(cuda[key].cpu(), cpu[key].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_cuda_log_probs_match_cpu_within_bfloat16_rounding(tiny_model, tmp_path):
    cpu, mask = logps_of(trainer_on("cpu", tiny_model, tmp_path / "cpu"), "cpu")
    cuda, _ = logps_of(trainer_on("cuda", tiny_model, tmp_path / "cuda"), "cuda")
    diff = (cuda - cpu)[mask].abs()
    print(f"cuda vs cpu log-probs: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}, over {mask.sum()} tokens")
    # bfloat16 keeps 8 bits of mantissa; the CPU's bfloat16 model is off by 0.0012 mean, 0.0028 max
    # here. Ten times that is rounding; a mask or adapter gone wrong moves log-probs by tenths.
    assert diff.mean() < 0.01 and diff.max() < 0.05
    assert torch.count_nonzero(cuda[~mask]) == 0


def test_cuda_steps_resume_on_cpu(tiny_model, tmp_path):
    model = model_ref("cuda-then-cpu")
    cuda = trainer_on("cuda", tiny_model, tmp_path)
    cuda.register(model)
    first = cuda.train("job-cuda-1", model, LR, groups())
    assert first.step == 1
    for key, value in first.metrics.items():
        assert math.isfinite(value), key
    assert first.metrics["grad_norm"] > 0
    weights = load_file(str(Path(first.checkpoint_path) / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}

    # A checkpoint written on the GPU, optimizer state included, continues on the CPU.
    cpu = trainer_on("cpu", tiny_model, tmp_path)
    assert cpu.latest_step(model) == 1
    second = cpu.train("job-cpu-2", model, LR, groups(sampled_step=1))
    assert second.step == 2
    optimizer = torch.load(Path(second.checkpoint_path) / "optimizer.pt", weights_only=True)
    assert float(optimizer["state"][0]["step"]) == 2.0
