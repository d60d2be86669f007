"""Rollout throughput: completion tokens/s through the inference worker, adapter ``name@step`` against the base model.

One real inference worker (``python -m inference_worker``: vLLM CPU with LoRA
on) serves the base model and one LoRA adapter (r=8 on every projection, as
the trainer writes them, random non-zero weights), announced on the
checkpoint stream as a trainer would. Both targets are sampled on the *same*
server, so the flags are identical: the base model by its served name (no
adapter in the batch) and the adapter by ``name@step``.

Each batch sends ``requests`` chat completions (logprobs on, as rollouts ask)
of ``max_tokens`` each with ``ignore_eos`` (every answer is exactly that
long) at concurrency 1 and 8; batches of the two targets are interleaved
round by round. Columns: completion tokens/s of the batch (median and the
slowest round), per-request latency median and p99, and the adapter's
throughput as a share of the base model's.

Target: the adapter within 10% of the base model.

    python bench/bench_rollout.py --quick            # tiny model, 2 rounds (< 1 min once vLLM is up)
    python bench/bench_rollout.py                    # SmolLM2-135M (the embedded default), 5 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from _common import machine_line, median, percentile, print_table, verdict

import httpx

from tests.integration.inference.adapters import checkpoint_dir, write_adapter
from tests.integration.inference.worker import API_KEY, InferenceWorker, publish_checkpoint
from tests.support.services import run_redis

TARGET_GAP = 0.10
PROMPT = "Write a short story about an agent that plays a number guessing game, one turn at a time."


async def one_request(http: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[float, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "logprobs": True,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    response = await http.post("/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return time.perf_counter() - started, int(response.json()["usage"]["completion_tokens"])


async def batch(http: httpx.AsyncClient, model: str, concurrency: int, requests: int, max_tokens: int
                ) -> tuple[float, list[float]]:
    """``requests`` requests, ``concurrency`` in flight; returns (completion tokens/s, latencies)."""
    queue = list(range(requests))
    latencies: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            queue.pop()
            latency, n = await one_request(http, model, max_tokens)
            latencies.append(latency)
            tokens += n

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tokens / (time.perf_counter() - started), latencies


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp_name, run_redis(Path(tmp_name) / "redis") as redis_url:
        tmp = Path(tmp_name)
        base = model_path(args.model, tmp)
        root = tmp / "checkpoints"
        adapter_dir = write_adapter(base, checkpoint_dir(root, "bench", "rollout", 1), seed=1, scale=0.05)
        worker = InferenceWorker(redis_url=redis_url, base_model=base, checkpoint_root=root, log_path=tmp / "inference.log")
        try:
            started = time.perf_counter()
            await worker.wait_models({str(base)}, timeout=args.startup_timeout)
            startup = time.perf_counter() - started
            publish_checkpoint(redis_url, kind="saved", project="bench", model="rollout", step=1,
                               path=adapter_dir, base_model=str(base))
            await worker.wait_models({"rollout@1"}, timeout=60)
            targets = {"base": str(base), "adapter": "rollout@1"}
            async with httpx.AsyncClient(base_url=worker.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                for model in targets.values():  # first requests pay lazy set-up
                    await batch(http, model, 2, 2, 8)
                results: dict[tuple[int, str], list[tuple[float, list[float]]]] = {}
                for _ in range(args.rounds):
                    for concurrency in (1, 8):
                        for name, model in targets.items():
                            requests = concurrency * args.requests_per_client
                            results.setdefault((concurrency, name), []).append(
                                await batch(http, model, concurrency, requests, args.max_tokens)
                            )
        finally:
            await worker.aclose()

    print(machine_line())
    print(f"model {args.model} ({base.name}), vLLM CPU via the inference worker (started in {startup:.0f} s), "
          f"both targets on the same server (--enable-lora, max-loras 2, rank 8); {args.rounds} rounds, "
          f"{args.requests_per_client} requests per client, max_tokens {args.max_tokens}, ignore_eos")
    rows, ratios = [], {}
    for concurrency in (1, 8):
        base_tps = median([tps for tps, _ in results[(concurrency, "base")]])
        for name in ("base", "adapter"):
            runs = results[(concurrency, name)]
            tps = [t for t, _ in runs]
            latencies = [x for _, lat in runs for x in lat]
            ratios[(concurrency, name)] = median(tps) / base_tps
            rows.append([str(concurrency), name, f"{median(tps):,.1f}", f"{min(tps):,.1f}",
                         f"{median(latencies) * 1e3:,.0f}", f"{percentile(latencies, 99) * 1e3:,.0f}",
                         f"{median(tps) / base_tps:.1%}"])
    print_table(["concurrency", "target", "tok/s median", "tok/s worst", "latency ms", "p99 ms", "of base"], rows)
    for concurrency in (1, 8):
        gap = 1 - ratios[(concurrency, "adapter")]
        print(f"concurrency {concurrency}: adapter {gap:+.1%} slower than base (target within "
              f"{TARGET_GAP:.0%}) -> {verdict(gap <= TARGET_GAP)}")


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
    args = parser.parse_args()
    defaults = ("tiny", 2, 2, 32) if args.quick else ("smollm2", 5, 3, 128)
    for field, value in zip(("model", "rounds", "requests_per_client", "max_tokens"), defaults):
        if getattr(args, field) is None:
            setattr(args, field, value)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
