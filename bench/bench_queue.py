"""Queue overhead: a train call through Redis and a real Celery trainer worker, against the same core in process.

For each payload size (0.1, 1, 10, 50 MB of msgpack, driven by the sampled
token count) the same groups are trained two ways, interleaved job by job:

    queue      ``await QueueBackend.train(...)``: encode (``encode_groups`` validates as it
               packs) + SET payload + Celery send, worker GET + decode + ``Trainer.train``
               (which validates again)
               + record + pub/sub notify, read the result (wall, submit to result)
    in-process ``Trainer.train`` on the same tiny model in this process

    overhead = queue wall - train_s   (train_s: the worker's own ``Trainer.train`` time)

Two kinds of job per size: ``train`` (rewards differ: a real step) and
``no-signal`` (equal rewards: the step is made, nothing is trained), which
costs the queue exactly what a real job costs but trains in milliseconds, so
large payloads can be repeated. ``register`` rows (no payload) show the fixed
cost of a round trip; its first call on a fresh backend includes building the
Celery producer. The breakdown times each payload hop on its own, in this
process, against the same Redis: what the remainder (Celery delivery, claim,
record, notify) is left with.

The wire comparison sends the same groups, the content of a 1 MB job with
logprobs as msgpack doubles (as trainq sent them before ``encode_groups``
packed them as float32; the worker reads both), on each wire in turn, job by
job: the float32 wire carries ~1.85x the tokens per MB of this payload, so
its 1 MB row is a bigger job than the same row before the change.

Targets: overhead under 25 ms median at 1 MB, and under 2% of the step time
of the 10 MB train job. A real 10 MB step of the tiny model takes minutes on
2 CPUs, so by default its time is the 1 MB train step scaled by tokens (a
step is linear in tokens at one sequence per micro-batch); ``--train-10mb``
measures it.

    python bench/bench_queue.py --quick     # 0.1 and 1 MB, a few jobs (< 1 min)
    python bench/bench_queue.py             # 0.1, 1, 10, 50 MB (several minutes on 2 CPUs)
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from trainer_worker.__main__ import set_openmp_wait

set_openmp_wait("spin")  # as `python -m trainer_worker` does by default, before torch loads

import msgspec  # noqa: E402
from _common import machine_line, median, percentile, print_table, verdict  # noqa: E402

from producer import QueueBackend, TrainableModel, queue_backend  # noqa: E402
from producer.types import ModelRef, TrainConfig, TrajectoryGroup  # noqa: E402
from producer.validation import encode_groups, validate_groups  # noqa: E402
from tests.support.groups import make_group  # noqa: E402
from tests.support.services import run_redis, start_trainer_worker  # noqa: E402

GROUP_SIZE = 8
TOKENS_PER_TRAJECTORY = 1000  # under the tiny model's 2,048 positions, with the prompt
# One ~1,100-token sequence per micro-batch, so that a step's time is linear in its tokens (the 10 MB
# step is the 1 MB one scaled); worker and in-process trainer use the same.
BUDGET = 2048
TARGET_1MB_MS = 25.0
TARGET_10MB_FRACTION = 0.02

Encode = Callable[..., bytes]


def encode_float64(groups: list[TrajectoryGroup], *, allow_missing_logprobs: bool = False) -> bytes:
    """The float64 wire, which workers still read: validate, then logprobs as msgpack doubles."""
    validate_groups(groups, allow_missing_logprobs=allow_missing_logprobs)
    return msgspec.msgpack.encode(groups)


WIRES: dict[str, Encode] = {"float32": encode_groups, "float64": encode_float64}
HOPS = ("encode", "set", "get", "decode")  # encode: the producer's validation included


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    queued_s: list[float] = field(default_factory=list)
    inproc: list[float] = field(default_factory=list)

    @property
    def overhead(self) -> list[float]:
        return [w - t for w, t in zip(self.wall, self.train_s)]


def build_groups(target_mb: float, signal: bool, encode: Encode = encode_groups) -> list[TrajectoryGroup]:
    """Groups of 8 trajectories whose ``encode`` is about ``target_mb`` MB; equal rewards when not ``signal``."""
    probe = len(encode([make_group(GROUP_SIZE, TOKENS_PER_TRAJECTORY)]))
    n_groups = max(1, round(target_mb * 1e6 / probe))
    tokens = max(8, round(TOKENS_PER_TRAJECTORY * target_mb * 1e6 / (n_groups * probe)))
    rewards = None if signal else [1.0] * GROUP_SIZE
    return [make_group(GROUP_SIZE, tokens, seed=g, rewards=rewards) for g in range(n_groups)]


def hop_breakdown(groups: list[TrajectoryGroup], redis_url: str, reps: int,
                  encode: Encode = encode_groups) -> dict[str, float]:
    """Median seconds of each payload hop, run here against the same Redis."""
    import redis

    from trainer_worker.jobs import decode_groups

    client = redis.Redis.from_url(redis_url)
    times: dict[str, list[float]] = {k: [] for k in HOPS}
    for _ in range(reps):
        t1 = time.perf_counter()
        payload = encode(groups)
        t2 = time.perf_counter()
        client.set("trainq:bench:payload", payload, ex=60)
        t3 = time.perf_counter()
        fetched = client.get("trainq:bench:payload")
        t4 = time.perf_counter()
        decode_groups(fetched)
        t5 = time.perf_counter()
        for name, dt in zip(times, (t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[name].append(dt)
    client.delete("trainq:bench:payload")
    client.close()
    return {name: median(values) for name, values in times.items()}


async def main_async(args: argparse.Namespace) -> None:
    from tests.support.tiny_model import build_tiny_model
    from trainer_worker.core.trainer import Trainer

    plan = QUICK_PLAN if args.quick else FULL_PLAN
    with tempfile.TemporaryDirectory() as tmp_name, run_redis(Path(tmp_name) / "redis") as redis_url:
        tmp = Path(tmp_name)
        tiny = build_tiny_model(tmp / "tiny-llama")
        worker = start_trainer_worker(redis_url, str(tiny), tmp / "worker",
                                      extra=["--max-tokens-per-microbatch", str(BUDGET)])
        trainer = Trainer(str(tiny), str(tmp / "inproc"), max_tokens_per_microbatch=BUDGET)
        try:
            async with QueueBackend(redis_url, path=str(tmp / "logs")) as backend:
                model = TrainableModel("bench", "queue", base_model=str(tiny))
                started = time.perf_counter()
                await model.register(backend)
                cold_register = time.perf_counter() - started
                ref = ModelRef(project="bench-inproc", name="queue", base_model=str(tiny))
                trainer.register(ref)
                register = Samples()
                for _ in range(args.register_reps):
                    started = time.perf_counter()
                    await model.register(backend)
                    register.wall.append(time.perf_counter() - started)
                rows, results, tokens_of = [], {}, {}
                for size_mb, kind, reps in plan:
                    groups = build_groups(size_mb, signal=kind == "train")
                    n_bytes = len(encode_groups(groups))
                    n_tokens = sum(len(c.token_ids) for g in groups for t in g.trajectories for c in t.choices())
                    samples = await measure(backend, model, trainer, ref, groups, reps)
                    results[(size_mb, kind)] = (samples, groups, n_bytes)
                    rows.append(table_row(size_mb, kind, n_bytes, n_tokens, samples))
                    tokens_of[(size_mb, kind)] = n_tokens
                    print(f"  measured {size_mb} MB {kind}: {len(samples.wall)} jobs", flush=True)
                breakdown = {
                    size: hop_breakdown(results[(size, "no-signal")][1], redis_url, args.hop_reps)
                    for size in sorted({s for s, k, _ in plan if k == "no-signal"})
                }
                wire_rows = await compare_wires(backend, model, trainer, ref, redis_url,
                                                3 if args.quick else 10, args.hop_reps)
        finally:
            worker.stop()

    print()
    print(machine_line())
    print(f"tiny model ({tiny.name}), real trainer worker (prefork, 1 child), groups of {GROUP_SIZE} trajectories")
    print(f"register round trip (no payload): first call {cold_register * 1e3:.1f} ms (builds the Celery producer), "
          f"then median {median(register.wall) * 1e3:.1f} ms, p99 {percentile(register.wall, 99) * 1e3:.1f} ms "
          f"over {len(register.wall)}")
    print()
    print_table(
        ["size", "job", "MB", "tokens", "n", "in-proc ms", "queue wall ms", "train_s ms", "queued ms",
         "overhead ms", "p99 ms", "of step"],
        rows,
    )
    print()
    print("hops of the no-signal payloads, timed one by one in this process (median ms):")
    hop_rows = []
    for size, hops in breakdown.items():
        samples = results[(size, "no-signal")][0]
        # The worker validates inside Trainer.train, i.e. inside train_s: the producer's is overhead.
        payload_hops = sum(hops[k] for k in HOPS)
        hop_rows.append([
            f"{size:g} MB", *(f"{hops[k] * 1e3:.1f}" for k in HOPS),
            f"{payload_hops * 1e3:.1f}", f"{median(samples.overhead) * 1e3:.1f}",
            f"{(median(samples.overhead) - payload_hops) * 1e3:.1f}",
        ])
    print_table(["payload", "validate+encode", "SET", "GET", "decode", "sum", "overhead",
                 "rest"], hop_rows)
    print()
    print("the same groups (the content of a 1 MB job with float64 logprobs) on each wire, interleaved job by job:")
    print_table(["wire", "MB", "tokens", "n", "overhead ms", "p99 ms", "validate+encode", "SET", "GET", "decode"],
                wire_rows)
    print()
    one = results.get((1, "no-signal")) or results.get((1, "train"))
    if one:
        value = median(one[0].overhead) * 1e3
        print(f"overhead at 1 MB: median {value:.1f} ms (target < {TARGET_1MB_MS:.0f} ms) -> "
              f"{verdict(value < TARGET_1MB_MS)}")
    ten = results.get((10, "no-signal"))
    if ten:
        over = median(ten[0].overhead)
        if (10, "train") in results:
            step, how = median(results[(10, "train")][0].wall), "measured"
        else:  # a step is linear in tokens at one sequence per micro-batch: scale the 1 MB train step
            per_token = median(results[(1, "train")][0].wall) / tokens_of[(1, "train")]
            step, how = per_token * tokens_of[(10, "no-signal")], "1 MB train step scaled by tokens"
        print(f"overhead at 10 MB: {over * 1e3:.0f} ms of a {step:.1f} s step ({how}) = {over / step:.2%} "
              f"(target < {TARGET_10MB_FRACTION:.0%}) -> {verdict(over / step < TARGET_10MB_FRACTION)}")


async def measure(backend: QueueBackend, model: TrainableModel, trainer, ref: ModelRef,
                  groups: list[TrajectoryGroup], reps: int) -> Samples:
    samples = Samples()
    config = TrainConfig(learning_rate=1e-5)
    for _ in range(reps):
        started = time.perf_counter()
        result = await backend.train(model, groups, learning_rate=1e-5)
        samples.wall.append(time.perf_counter() - started)
        samples.train_s.append(result.train_s)
        samples.queued_s.append(result.queued_s)
        started = time.perf_counter()
        await asyncio.to_thread(trainer.train, f"inproc-{time.time_ns()}", ref, config, groups)
        samples.inproc.append(time.perf_counter() - started)
    return samples


@contextmanager
def sent_as(encode: Encode) -> Iterator[None]:
    """``QueueBackend`` encodes the groups with ``encode`` for the duration."""
    original = queue_backend.encode_groups
    queue_backend.encode_groups = encode
    try:
        yield
    finally:
        queue_backend.encode_groups = original


async def compare_wires(backend: QueueBackend, model: TrainableModel, trainer, ref: ModelRef, redis_url: str,
                        reps: int, hop_reps: int) -> list[list[str]]:
    """The same groups (a 1 MB job on the float64 wire) sent on each wire, job by job: table rows."""
    groups = build_groups(1, signal=False, encode=WIRES["float64"])
    n_tokens = sum(len(c.token_ids) for g in groups for t in g.trajectories for c in t.choices())
    samples = {wire: Samples() for wire in WIRES}
    for _ in range(reps):
        for wire, encode in WIRES.items():
            with sent_as(encode):
                one = await measure(backend, model, trainer, ref, groups, 1)
            for name in ("wall", "train_s", "queued_s", "inproc"):
                getattr(samples[wire], name).extend(getattr(one, name))
    rows = []
    for wire, encode in WIRES.items():
        hops = hop_breakdown(groups, redis_url, hop_reps, encode=encode)
        overhead = samples[wire].overhead
        rows.append([
            wire, f"{len(encode(groups)) / 1e6:.2f}", f"{n_tokens:,}", str(reps),
            f"{median(overhead) * 1e3:.1f}", f"{percentile(overhead, 99) * 1e3:.1f}",
            *(f"{hops[k] * 1e3:.1f}" for k in HOPS),
        ])
    return rows


def table_row(size_mb: float, kind: str, n_bytes: int, n_tokens: int, s: Samples) -> list[str]:
    step = median(s.wall)
    return [
        f"{size_mb:g} MB", kind, f"{n_bytes / 1e6:.2f}", f"{n_tokens:,}", str(len(s.wall)),
        f"{median(s.inproc) * 1e3:,.1f}", f"{step * 1e3:,.1f}", f"{median(s.train_s) * 1e3:,.1f}",
        f"{median(s.queued_s) * 1e3:.1f}", f"{median(s.overhead) * 1e3:.1f}",
        f"{percentile(s.overhead, 99) * 1e3:.1f}", f"{median(s.overhead) / step:.1%}",
    ]


# (MB, job kind, jobs): a no-signal row per size, real training where it fits the time.
QUICK_PLAN = [(0.1, "train", 1), (0.1, "no-signal", 3), (1, "no-signal", 5)]
FULL_PLAN = [
    (0.1, "train", 3), (0.1, "no-signal", 10),
    (1, "train", 2), (1, "no-signal", 10),
    (10, "no-signal", 5),
    (50, "no-signal", 3),
]
TRAIN_10MB = (10, "train", 1)  # --train-10mb: ~15 min of tiny-model training per job on 2 CPUs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.1 and 1 MB, a few jobs each (< 1 min)")
    parser.add_argument("--register-reps", type=int, default=10)
    parser.add_argument("--hop-reps", type=int, default=3)
    parser.add_argument("--train-10mb", action="store_true", help="also run a real 10 MB train step (slow on CPU)")
    args = parser.parse_args()
    if args.train_10mb:
        FULL_PLAN.insert(4, TRAIN_10MB)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
