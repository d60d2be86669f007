"""Trainer throughput: tokens/s and MFU of ``Trainer.train``, packed rows against length-sorted padding.

Prints tables and exits 0. Per model, attention implementation (the trainer's
per-sequence ``trainq_segments`` and transformers' masked ``sdpa``) and packing
mode, over measured steps after one warm-up step:

    step_s         wall time of ``Trainer.train`` (tokenize, forward/backward, AdamW, save): median, p99
    trained_tok/s  sampled assistant tokens per second (the tokens that carry loss)
    seq_tok/s      real (non-padding) tokens forwarded per second
    pad_frac       share of forwarded positions that are padding
    MFU            achieved FLOP/s / the matmul peak measured in this run, same device and dtype
    peak_GiB       (CUDA) most GPU memory the measured steps held, torch's allocator

FLOP model, fixed: ``6 * N * T`` per step, ``N`` = base-model parameter count
(embeddings included, LoRA excluded), ``T`` = real tokens forwarded. It counts
a full backward although only LoRA weights train (the activation gradients
still flow through every layer), and ignores attention's ``T^2`` term. The
peak is the best of several large square matmuls in the training dtype
(float32 on CPU, bfloat16 on CUDA), ``2 n^3`` FLOP each.

Models: ``tiny`` (the test model), ``smollm2`` (SmolLM2-135M-Instruct, the
embedded default, via ``resolve_base_model``) on CPU; on CUDA a 0.5B-class
Llama built from Qwen2.5-0.5B's shapes with random weights, trained at 16k
tokens per micro-batch, next to prime-rl's published 13,342 tokens/s (10.9%
MFU) for Qwen3-0.6B LoRA at 16k on one H100.

OpenMP threads wait as ``python -m trainer_worker`` has them wait by default
(a short spin) unless the environment says otherwise; ``--compare-wait-policy``
also times one tiny-model step under each wait in fresh processes,
interleaved, alone and beside a process that keeps every core busy.

    python bench/bench_trainer.py --quick                 # tiny + a short SmolLM2 step (< 1 min)
    python bench/bench_trainer.py                         # tiny + SmolLM2, packed vs padded, wait policies
    python bench/bench_trainer.py --device cuda           # 0.5B-class model at 16k tokens (GPU)
    python bench/bench_trainer.py --nproc-per-node 1 2    # tokens/s on 1 and 2 FSDP2 ranks, scaling efficiency
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trainer_worker.__main__ import set_openmp_wait

set_openmp_wait("spin")  # as `python -m trainer_worker` does by default, before torch loads

from _common import machine_line, median, percentile, print_table  # noqa: E402

from trainer_worker.core.attention import ATTENTION  # noqa: E402

PRIME_RL_H100 = {"tokens/s": 13_342, "mfu": 0.109, "what": "prime-rl, Qwen3-0.6B LoRA, 16k seq, 1x H100"}
H100_BF16_DENSE_PEAK = 989e12


@dataclass(frozen=True)
class Workload:
    """One model and the groups it trains on."""

    model: str
    groups: int
    group_size: int
    min_len: int
    max_len: int
    budget: int
    steps: int


def matmul_peak(device: str, n: int) -> float:
    """Best FLOP/s of ``n x n`` matmuls in the training dtype."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device == "cuda" else 3
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - start))
    return best


def make_groups(w: Workload, vocab: int, seed: int = 0):
    from producer.types import Choice, Trajectory, TrajectoryGroup

    rng = random.Random(seed)
    groups = []
    for _ in range(w.groups):
        trajectories = []
        for _ in range(w.group_size):
            length = rng.randint(w.min_len, w.max_len)  # uneven lengths: where padding hurts
            ids = [rng.randrange(3, vocab) for _ in range(length)]
            choice = Choice(token_ids=ids, logprobs=[-3.0] * length)
            messages = [{"role": "user", "content": "Guess the number between 1 and 100."}]
            trajectories.append(Trajectory([*messages, choice], reward=rng.random()))
        groups.append(TrajectoryGroup(trajectories, sampled_step=0))
    return groups


def run_mode(model_path: Path, mode: str, w: Workload, device: str, attention: str = ATTENTION) -> dict[str, float]:
    import torch

    from trainer_worker.core.trainer import Trainer

    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(str(model_path), root, device=device, max_tokens_per_microbatch=w.budget, packing=mode,
                          attn_implementation=attention)
        params = trainer.num_base_parameters
        groups = make_groups(w, min(len(trainer.tokenizer), trainer._loaded.vocab_size))
        times, outcomes = time_steps(trainer, w, groups, name=mode,
                                     after_warmup=torch.cuda.reset_peak_memory_stats if device == "cuda" else None)
        positions = _forwarded_positions(trainer, groups)
    peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
    metrics = outcomes[-1].metrics
    step_s = median(times)
    seq_tokens = metrics["num_sequence_tokens"]
    return {
        "step_s": step_s,
        "step_p99": percentile(times, 99),
        "trained_tok/s": metrics["num_tokens"] / step_s,
        "seq_tok/s": seq_tokens / step_s,
        "pad_frac": 1.0 - seq_tokens / positions,
        "microbatches": metrics["num_microbatches"],
        "flop/s": 6 * params * seq_tokens / step_s,
        "params": float(params),
        "peak_gib": peak_bytes / 2**30,
    }


def time_steps(trainer, w: Workload, groups, *, name: str, after_warmup=None) -> tuple[list[float], list]:
    """Register a model on ``trainer`` (a ``Trainer`` or a ``GroupTrainer``), take one warm-up step,
    then time ``w.steps`` calls of ``train``; return the seconds and the outcomes."""
    from producer.types import ModelRef, TrainConfig

    model = ModelRef(project="bench", name=name, base_model=w.model)
    trainer.register(model)
    config = TrainConfig(learning_rate=1e-4)
    trainer.train("warmup", model, config, groups)
    if after_warmup is not None:
        after_warmup()
    times, outcomes = [], []
    for step in range(w.steps):
        start = time.perf_counter()
        outcomes.append(trainer.train(f"job-{step}", model, config, groups))
        times.append(time.perf_counter() - start)
    return times, outcomes


def run_ranks(model_path: Path, w: Workload, ranks: int, *, torchrun: bool) -> dict[str, float]:
    """One workload on ``ranks`` FSDP2 ranks under torchrun (gloo on the CPU), or in this process
    (``torchrun=False``, one rank); the ranks share this machine's cores."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from trainer_worker.core.trainer import Trainer
    from trainer_worker.group.client import GroupTrainer
    from trainer_worker.settings import TrainerSettings

    vocab = min(len(AutoTokenizer.from_pretrained(model_path)), AutoConfig.from_pretrained(model_path).vocab_size)
    groups = make_groups(w, vocab)
    with tempfile.TemporaryDirectory() as root:
        if torchrun:
            settings = TrainerSettings(base_model=w.model, checkpoint_root=root, nproc_per_node=ranks,
                                       max_tokens_per_microbatch=w.budget)
            trainer = GroupTrainer(settings, str(model_path))
        else:
            trainer = Trainer(str(model_path), root, max_tokens_per_microbatch=w.budget)
        try:
            times, outcomes = time_steps(trainer, w, groups, name=f"ranks-{ranks}")
            figures = trainer.last_ranks if torchrun else []
        finally:
            if torchrun:
                trainer.close()
    step_s = median(times)
    metrics = outcomes[-1].metrics
    threads = max(1, (os.cpu_count() or 1) // ranks) if torchrun and ranks > 1 else torch.get_num_threads()
    return {
        "step_s": step_s,
        "trained_tok/s": metrics["num_tokens"] / step_s,
        "seq_tok/s": metrics["num_sequence_tokens"] / step_s,
        "threads": float(threads),
        "rank_tok/s": [f.tokens / f.step_s for f in figures],
        "collective_frac": max((f.collective_s / f.step_s for f in figures), default=0.0),
    }


def scaling(loads: list[Workload], ranks: list[int]) -> list[list[str]]:
    """Tokens/s on 1..N ranks, each against one process on the same machine."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in loads:
            path = model_path(w.model, Path(tmp))
            base = run_ranks(path, w, 1, torchrun=False)
            for n, torchrun in [(1, False), *((n, True) for n in ranks)]:
                r = base if (n, torchrun) == (1, False) else run_ranks(path, w, n, torchrun=torchrun)
                speedup = r["seq_tok/s"] / base["seq_tok/s"]
                rows.append([
                    w.model, str(n), "torchrun" if torchrun else "in process", f"{r['threads']:.0f}",
                    f"{r['step_s']:.3f}", f"{r['trained_tok/s']:,.0f}", f"{r['seq_tok/s']:,.0f}",
                    " / ".join(f"{t:,.0f}" for t in r["rank_tok/s"]) or "-",
                    f"{r['collective_frac']:.0%}" if torchrun else "-", f"{speedup:.2f}x", f"{speedup / n:.0%}",
                ])
                print("  done:", " ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _forwarded_positions(trainer, groups) -> int:
    from producer.types import TrainConfig
    from trainer_worker.core.batch import prepare_batch
    from trainer_worker.core.packing import build_microbatches
    from trainer_worker.core.tokenize import tokenize_trajectory

    batch = prepare_batch(groups, 0, TrainConfig(), lambda t: tokenize_trajectory(t, trainer.tokenizer))
    return sum(b.num_tokens for b in build_microbatches(batch.sequences, trainer.max_tokens_per_microbatch, mode=trainer.packing))


def model_path(name: str, tmp: Path) -> Path:
    from tests.support.tiny_model import build_tiny_model

    if name == "tiny":
        return build_tiny_model(tmp / "tiny-llama")
    if name == "smollm2":
        from producer.base_models import resolve_base_model

        return Path(resolve_base_model("trainq/smollm2-135m-instruct"))
    if name == "qwen-0.5b-shape":
        return build_half_billion(tmp / "qwen-0.5b-shape")
    raise ValueError(name)


def build_half_billion(path: Path) -> Path:
    """A Llama with Qwen2.5-0.5B's shapes (494M parameters), random weights, the tiny model's tokenizer.

    Llama, not Qwen2, so the tokenizer reloads as saved (see DESIGN, environment
    facts); the only difference is Qwen2's q/k/v bias, a rounding error in FLOPs.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.support.tiny_model import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(path.parent / "tiny-tokenizer"))
    config = LlamaConfig(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def workloads(args: argparse.Namespace) -> list[Workload]:
    if args.device == "cuda":
        # 16k-token micro-batches of long rollouts, as prime-rl's figure.
        return [Workload("qwen-0.5b-shape", 4, 8, 1024, 7168, 16_384, 3 if not args.quick else 1)]
    if args.quick:
        return [Workload("tiny", 4, 4, 16, 480, 2048, 2), Workload("smollm2", 1, 2, 16, 100, 2048, 1)]
    return [Workload("tiny", 8, 4, 16, 480, 2048, 3), Workload("smollm2", 2, 4, 16, 480, 2048, 2)]


def budget_sweep(budgets: tuple[int, ...], attentions: list[str]) -> list[list[str]]:
    """Packed rows of several sequences pay attention over the whole row under a block-diagonal
    mask (sdpa computes every block), and only over each sequence under ``ATTENTION``:
    time the same step per budget."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path("tiny", Path(tmp))
        for budget in budgets:
            for attention in attentions:
                r = run_mode(path, "packed", Workload("tiny", 2, 4, 900, 1000, budget, 2), "cpu", attention)
                rows.append([str(budget), attention, f"{r['step_s']:.3f}", f"{r['step_p99']:.3f}",
                             f"{r['seq_tok/s']:,.0f}", f"{r['microbatches']:.0f}"])
    return rows


def openmp_wait() -> str:
    """How this process's OpenMP threads wait, as its environment says."""
    return " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ) or "default"


# What shares the CPUs with a CPU trainer in the local stack: vLLM decoding, torch matmuls on every core.
_BUSY_NEIGHBOUR = (
    "import os, torch; torch.set_num_threads(os.cpu_count()); a = torch.randn(512, 512)\n"
    "while True: a = torch.tanh(a @ a)"
)
WAIT_POLICIES = {  # label -> the environment a training process starts with
    "unset (libgomp default)": {},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "short spin (GOMP_SPINCOUNT=10000)": {"GOMP_SPINCOUNT": "10000"},
}


def compare_wait_policy(rounds: int) -> list[list[str]]:
    """One tiny-model train step per fresh process, under each OpenMP wait policy, interleaved: alone, then
    beside a process that keeps every core busy (vLLM sampling while a step trains, in the pipelined loop)."""
    code = (
        "import sys, time; sys.argv=['x']; import bench_trainer as b; from pathlib import Path; import tempfile; "
        "w=b.Workload('tiny',4,4,16,480,2048,2); "
        "d=tempfile.mkdtemp(); r=b.run_mode(b.model_path('tiny', Path(d)), 'packed', w, 'cpu'); print(r['step_s'])"
    )
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    rows = []
    for beside in ("nothing", "a busy process"):
        neighbour = subprocess.Popen([sys.executable, "-c", _BUSY_NEIGHBOUR]) if beside != "nothing" else None
        try:
            times: dict[str, list[float]] = {label: [] for label in WAIT_POLICIES}
            for _ in range(rounds):
                for label, env in WAIT_POLICIES.items():
                    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent,
                                          env={**base_env, **env}, capture_output=True, text=True, check=False)
                    lines = done.stdout.strip().splitlines()
                    if done.returncode == 0 and lines:
                        times[label].append(float(lines[-1]))
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
        rows += [[beside, label, str(len(t)), f"{median(t):.3f}" if t else "-",
                  f"{percentile(t, 99):.3f}" if t else "-"] for label, t in times.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="short workloads, no wait-policy comparison (< 1 min)")
    parser.add_argument("--models", default="", help="comma-separated subset of the device's models")
    parser.add_argument("--attention", nargs="+", default=[ATTENTION, "sdpa"],
                        help=f"attention implementations to time (default: {ATTENTION}, the trainer's, and sdpa)")
    parser.add_argument("--nproc-per-node", type=int, nargs="+", default=None, metavar="N",
                        help="only the scaling table: the workloads on N FSDP2 ranks under torchrun (1 is also "
                        "run in process, the baseline), e.g. --nproc-per-node 1 2")
    parser.add_argument("--compare-wait-policy", type=int, default=None, metavar="ROUNDS",
                        help="rounds of the OpenMP wait-policy comparison (default: 2 in full mode on CPU, 0 in quick)")
    args = parser.parse_args()

    import torch

    loads = [w for w in workloads(args) if not args.models or w.model in args.models.split(",")]
    if args.nproc_per_node:
        print_scaling(loads, args.nproc_per_node)
        return
    peak = matmul_peak(args.device, 8192 if args.device == "cuda" else 2048)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in loads:
            path = model_path(w.model, Path(tmp))
            for attention, mode in itertools.product(args.attention, ("packed", "padded")):
                r = run_mode(path, mode, w, args.device, attention)
                rows.append([
                    w.model, attention, mode, f"{r['params'] / 1e6:.1f}M", f"{r['step_s']:.3f}", f"{r['step_p99']:.3f}",
                    f"{r['trained_tok/s']:,.0f}", f"{r['seq_tok/s']:,.0f}", f"{r['pad_frac']:.2f}",
                    f"{r['microbatches']:.0f}", f"{r['flop/s'] / 1e9:,.1f}", f"{r['flop/s'] / peak:.1%}",
                ])
                if args.device == "cuda":
                    rows[-1] += [f"{r['flop/s'] / H100_BF16_DENSE_PEAK:.1%}", f"{r['peak_gib']:.1f}"]
                print("  done:", " ".join(rows[-1]), file=sys.stderr, flush=True)  # the table comes at the end

    print(machine_line())
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(f"device={args.device}{gpu} torch {torch.__version__} threads={torch.get_num_threads()} "
          f"OpenMP wait {openmp_wait()} matmul_peak={peak / 1e9:,.1f} GFLOP/s "
          f"({'bf16 8192^2' if args.device == 'cuda' else 'fp32 2048^2'})")
    for w in loads:
        print(f"  {w.model}: {w.groups} groups x {w.group_size}, lengths {w.min_len}-{w.max_len}, "
              f"budget {w.budget} tokens/micro-batch, {w.steps} measured steps after 1 warm-up")
    headers = ["model", "attention", "mode", "params", "step_s", "p99_s", "trained_tok/s", "seq_tok/s", "pad_frac",
               "mbs", "GFLOP/s", "MFU(meas)"]
    if args.device == "cuda":
        headers += ["MFU(989T)", "peak_GiB"]
    print_table(headers, rows)
    if args.device == "cuda":
        ref = PRIME_RL_H100
        print(f"reference: {ref['what']}: {ref['tokens/s']:,} tokens/s, {ref['mfu']:.1%} MFU")

    if args.device == "cpu" and not args.quick and not args.models:
        print()
        print("packed row length on CPU: tiny model, 2 groups x 4 trajectories of 900-1,000 tokens, packed, "
              "by micro-batch budget (one packed row per micro-batch):")
        print_table(["budget", "attention", "step_s", "p99_s", "seq_tok/s", "mbs"],
                    budget_sweep((1024, 2048, 4096, 8192), args.attention))

    rounds = args.compare_wait_policy
    if rounds is None:
        rounds = 0 if (args.quick or args.device == "cuda") else 2
    if rounds:
        print()
        print("OpenMP wait policy, one tiny-model step (4x4 groups) per fresh process, interleaved:")
        print_table(["beside", "OpenMP wait", "n", "step_s median", "p99"], compare_wait_policy(rounds))


def print_scaling(loads: list[Workload], ranks: list[int]) -> None:
    import torch

    rows = scaling(loads, ranks)
    print(machine_line())
    print(f"torch {torch.__version__}, gloo, FSDP2 (fully_shard per decoder layer and on the peft model); "
          f"OpenMP wait {openmp_wait()}")
    for w in loads:
        print(f"  {w.model}: {w.groups} groups x {w.group_size}, lengths {w.min_len}-{w.max_len}, "
              f"budget {w.budget} tokens/micro-batch, {w.steps} measured steps after 1 warm-up")
    print("step_s: median wall time of a train call (the IPC to the leader and the checkpoint included); "
          "speedup: seq_tok/s over in process; efficiency: speedup / ranks; collectives: the largest "
          "share of a rank's step spent in them")
    print_table(["model", "ranks", "how", "threads/rank", "step_s", "trained_tok/s", "seq_tok/s",
                 "tok/s per rank", "collectives", "speedup", "efficiency"], rows)


if __name__ == "__main__":
    main()
