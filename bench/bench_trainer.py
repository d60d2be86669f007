"""Trainer throughput on the tiny model: packed rows against length-sorted padding.

Prints one table and exits 0. Numbers, per packing mode, over measured steps
after one warm-up step:

    step_s         wall time of ``Trainer.train`` (tokenize, forward/backward, AdamW, save)
    trained_tok/s  sampled assistant tokens per second (the tokens that carry loss)
    seq_tok/s      real (non-padding) tokens forwarded per second
    pad_frac       share of forwarded positions that are padding
    MFU            achieved FLOP/s / a matmul peak measured in this run

FLOP model, fixed: ``6 * N * T`` per step, ``N`` = base-model parameter count
(embeddings included, LoRA excluded), ``T`` = real tokens forwarded. It counts
a full backward although only LoRA weights train (the activation gradients
still flow through every layer), and ignores attention's ``T^2`` term, which is
small at these lengths. The peak is the best of a few square float32 (CPU) or
bfloat16 (CUDA) matmuls, ``2 n^3`` FLOP each.

    python bench/bench_trainer.py [--device cpu|cuda] [--steps 3] [--groups 8]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def matmul_peak(device: str) -> float:
    import torch

    n = 2048 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - start))
    return best


def make_groups(num_groups: int, group_size: int, vocab: int, seed: int):
    from producer.types import Choice, Trajectory, TrajectoryGroup

    rng = random.Random(seed)
    groups = []
    for _ in range(num_groups):
        trajectories = []
        for _ in range(group_size):
            length = rng.randint(16, 480)  # uneven lengths: where padding hurts
            ids = [rng.randrange(3, vocab) for _ in range(length)]
            choice = Choice(token_ids=ids, logprobs=[-3.0] * length)
            messages = [{"role": "user", "content": "Guess the number between 1 and 100."}]
            trajectories.append(Trajectory([*messages, choice], reward=rng.random()))
        groups.append(TrajectoryGroup(trajectories, sampled_step=0))
    return groups


def run_mode(model_path: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    from producer.types import ModelRef, TrainConfig
    from trainer_worker.core.trainer import Trainer

    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(str(model_path), root, device=args.device, max_tokens_per_microbatch=args.budget, packing=mode)
        model = ModelRef(project="bench", name=mode, base_model="tiny")
        trainer.register(model)
        params = trainer.num_base_parameters
        groups = make_groups(args.groups, args.group_size, len(trainer.tokenizer), seed=0)
        config = TrainConfig(learning_rate=1e-4)
        trainer.train("warmup", model, config, groups)
        times, outcomes = [], []
        for step in range(args.steps):
            start = time.perf_counter()
            outcomes.append(trainer.train(f"job-{step}", model, config, groups))
            times.append(time.perf_counter() - start)
    metrics = outcomes[-1].metrics
    step_s = sum(times) / len(times)
    seq_tokens = metrics["num_sequence_tokens"]
    positions = _forwarded_positions(trainer, groups)
    return {
        "step_s": step_s,
        "trained_tok/s": metrics["num_tokens"] / step_s,
        "seq_tok/s": seq_tokens / step_s,
        "pad_frac": 1.0 - seq_tokens / positions,
        "microbatches": metrics["num_microbatches"],
        "flop/s": 6 * params * seq_tokens / step_s,
        "params": float(params),
    }


def _forwarded_positions(trainer, groups) -> int:
    from trainer_worker.core.batch import prepare_batch
    from trainer_worker.core.packing import build_microbatches
    from trainer_worker.core.tokenize import tokenize_trajectory
    from producer.types import TrainConfig

    batch = prepare_batch(groups, 0, TrainConfig(), lambda t: tokenize_trajectory(t, trainer.tokenizer))
    return sum(b.num_tokens for b in build_microbatches(batch.sequences, trainer.max_tokens_per_microbatch, mode=trainer.packing))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--budget", type=int, default=2048, help="max_tokens_per_microbatch")
    args = parser.parse_args()

    import torch

    from trainer_worker.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_tiny_model(Path(tmp) / "tiny-llama")
        peak = matmul_peak(args.device)
        rows = {mode: run_mode(model_path, mode, args) for mode in ("packed", "padded")}

    print(f"device={args.device} torch_threads={torch.get_num_threads()} base_params={rows['packed']['params']:.0f} "
          f"groups={args.groups}x{args.group_size} budget={args.budget} matmul_peak={peak / 1e9:.1f} GFLOP/s")
    header = f"{'mode':<8}{'step_s':>9}{'trained_tok/s':>15}{'seq_tok/s':>11}{'pad_frac':>10}{'mbs':>5}{'GFLOP/s':>9}{'MFU':>8}"
    print(header)
    print("-" * len(header))
    for mode, r in rows.items():
        print(f"{mode:<8}{r['step_s']:>9.3f}{r['trained_tok/s']:>15.0f}{r['seq_tok/s']:>11.0f}{r['pad_frac']:>10.2f}"
              f"{r['microbatches']:>5.0f}{r['flop/s'] / 1e9:>9.2f}{r['flop/s'] / peak:>8.1%}")


if __name__ == "__main__":
    main()
