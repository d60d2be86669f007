"""Checkpoint to servable: from a train call's return to the first answer of ``name@step``.

A real trainer worker and a real inference worker (vLLM CPU) on the tiny
model share one Redis and one checkpoint folder, as the embedded stack runs
them. Each step: ``await backend.train(...)`` returns, then this process asks
``name@step`` for one token (``/v1/completions``) every few milliseconds until
it answers. Per step the table splits the time:

    event        the checkpoint event's ``created_at`` relative to the train call's return
                 (negative: the worker records the step and the event in one pipeline
                 before the caller hears of it)
    listed       return -> ``name@step`` first in ``/v1/models`` (polled)
    servable     return -> first 1-token answer of ``name@step``: the figure the target is about

Target: servable under 1 s median on local disk.

    python bench/bench_checkpoint_latency.py --quick    # 3 steps
    python bench/bench_checkpoint_latency.py            # 10 steps
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from trainer_worker.__main__ import set_openmp_wait

set_openmp_wait("spin")  # as `python -m trainer_worker` does by default, before torch loads

import httpx  # noqa: E402
import redis  # noqa: E402
from _common import machine_line, median, percentile, print_table, verdict  # noqa: E402

from producer import QueueBackend, TrainableModel  # noqa: E402
from producer.keys import CHECKPOINT_STREAM  # noqa: E402
from tests.integration.inference.worker import InferenceWorker  # noqa: E402
from tests.support.groups import make_groups  # noqa: E402
from tests.support.services import run_redis, start_trainer_worker  # noqa: E402

TARGET_S = 1.0
POLL_S = 0.005


async def first_answer(http: httpx.AsyncClient, name: str, since: float, timeout: float = 60.0) -> tuple[float, float]:
    """Poll until ``name`` answers one token; return (listed, servable) seconds after ``since`` (perf_counter)."""
    listed = None
    deadline = time.perf_counter() + timeout
    body = {"model": name, "prompt": "0", "max_tokens": 1, "temperature": 0.0}
    while time.perf_counter() < deadline:
        if listed is None:
            models = await http.get("/v1/models", timeout=10)
            if models.status_code == 200 and any(card["id"] == name for card in models.json()["data"]):
                listed = time.perf_counter() - since
        response = await http.post("/v1/completions", json=body, timeout=30)
        if response.status_code == 200:
            servable = time.perf_counter() - since
            return (listed if listed is not None else servable), servable
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"{name} did not answer within {timeout} s")


def event_created_at(redis_url: str, name: str, step: int) -> float:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        for _id, fields in reversed(client.xrange(CHECKPOINT_STREAM)):
            if fields.get("model") == name and fields.get("step") == str(step):
                return float(fields["created_at"])
    return float("nan")


async def main_async(args: argparse.Namespace) -> None:
    from tests.support.tiny_model import build_tiny_model

    rows, servable, listed_all = [], [], []
    with tempfile.TemporaryDirectory() as tmp_name, run_redis(Path(tmp_name) / "redis") as redis_url:
        tmp = Path(tmp_name)
        tiny = build_tiny_model(tmp / "tiny-llama")
        root = tmp / "checkpoints"
        inference = InferenceWorker(redis_url=redis_url, base_model=tiny, checkpoint_root=root,
                                    log_path=tmp / "inference.log")
        trainer = start_trainer_worker(redis_url, str(tiny), tmp / "trainer", checkpoint_root=root)
        try:
            await inference.wait_models({str(tiny)}, timeout=args.startup_timeout)
            async with QueueBackend(redis_url, path=str(tmp / "logs")) as backend:
                model = TrainableModel("latency", "bench", base_model=str(tiny))
                await model.register(backend)
                await inference.wait_models({"latency@0"}, timeout=60)
                groups = make_groups(2, n_trajectories=4, n_tokens=16)
                for _ in range(args.steps):
                    result = await backend.train(model, groups, learning_rate=1e-5)
                    returned = time.perf_counter()
                    returned_wall = time.time()
                    name = model.get_inference_name(result.step)
                    listed, ready = await first_answer(inference.http, name, returned)
                    event = event_created_at(redis_url, model.name, result.step) - returned_wall
                    servable.append(ready)
                    listed_all.append(listed)
                    rows.append([name, f"{result.train_s * 1e3:,.0f}", f"{event * 1e3:+.1f}",
                                 f"{listed * 1e3:.1f}", f"{ready * 1e3:.1f}"])
        finally:
            trainer.stop()
            await inference.aclose()

    print(machine_line())
    print(f"tiny model, real trainer worker + inference worker (vLLM CPU), local disk; poll every {POLL_S * 1e3:.0f} ms")
    print_table(["name@step", "train_s ms", "event ms", "listed ms", "servable ms"], rows)
    print()
    print_table(["from the train call's return", "median ms", "p99 ms"], [
        ["listed in /v1/models", f"{median(listed_all) * 1e3:.1f}", f"{percentile(listed_all, 99) * 1e3:.1f}"],
        ["first answer (servable)", f"{median(servable) * 1e3:.1f}", f"{percentile(servable, 99) * 1e3:.1f}"],
    ])
    print(f"servable median {median(servable) * 1e3:.0f} ms (target < {TARGET_S * 1e3:.0f} ms) -> "
          f"{verdict(median(servable) < TARGET_S)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 3 if args.quick else 10
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
