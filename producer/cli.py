"""``trainq``: the command line of the local stack and of any deployed one.

    trainq demo                 train the yes/no/maybe example on the embedded default, locally
    trainq up                   run the local stack (Redis, trainer, inference) until Ctrl-C
    trainq down                 stop the local stack that `trainq up` (or a script) runs under --path
    trainq status               queues (and their leader), workers (leader, standby, dead) and models
    trainq jobs                 recent jobs, newest first
    trainq plot MODEL_DIR       reward and loss against step, as a PNG

``status`` and ``jobs`` read Redis: ``--redis-url`` (or ``TRAINQ_REDIS_URL``),
else the local stack recorded under ``--path``. Only argparse is imported
before a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.defaults import DEFAULT_PATH

if TYPE_CHECKING:
    from producer.workers import WorkerInfo

__all__ = ["build_parser", "main"]


# ------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    example = _load_example("yes_no_maybe")
    config = example.Config(steps=args.steps, serial=args.serial)
    if args.learning_rate is not None:
        config.learning_rate = args.learning_rate
    if args.base_model:
        config.base_model = args.base_model

    async def run() -> list[Any]:
        from producer.local_backend import LocalBackend

        backend = LocalBackend(args.path, device=args.device)
        try:
            return await example.main(backend, config)
        finally:
            await backend.close()

    started = time.monotonic()
    records = asyncio.run(run())
    minutes = (time.monotonic() - started) / 60
    print()
    print(_table(
        ["step", "sampled at", "reward", "loss", "seconds"],
        [[r.step, r.sampled_at, f"{r.reward:.3f}", "-" if r.loss is None else f"{r.loss:+.4f}", f"{r.seconds:.1f}"] for r in records],
    ))
    reached = next((r.step for r in records if r.reward >= 0.9), None)
    per_step = sum(r.seconds for r in records) / max(1, len(records)) / 60
    print(f"\n{len(records)} steps in {minutes:.1f} min ({per_step:.2f} min per step, startup included in the total)")
    print(f"mean reward >= 0.9 first at step {reached}" if reached is not None else "mean reward stayed below 0.9")
    model_dir = Path(args.path) / config.project / "models" / config.name
    print(f"history: {model_dir / 'history.jsonl'}   plot it: trainq plot {model_dir}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from producer.base_models import EMBEDDED_DEFAULT
    from producer.local_backend import LocalBackend

    async def run() -> int:
        backend = LocalBackend(
            args.path, base_model=args.base_model or EMBEDDED_DEFAULT, inference_port=args.inference_port,
            api_key=args.api_key, device=args.device,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            stack = await backend.start()
            if not backend.owns_stack:
                print(f"a stack already runs under {args.path} (pid {stack.owner_pid}); nothing to do")
                return 0
            print(_describe_stack(stack, args.path), flush=True)
            print("\nCtrl-C stops it.", flush=True)
            while not stop.is_set():
                dead = [role for role, proc in backend._owned.items() if proc.poll() is not None]
                if dead:
                    print(f"trainq: {', '.join(dead)} exited; see {args.path}/logs/ — stopping", file=sys.stderr)
                    return 1
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                except asyncio.TimeoutError:
                    pass
            return 0
        finally:
            await backend.close()

    return asyncio.run(run())


def cmd_down(args: argparse.Namespace) -> int:
    from producer._stack_record import forget_stack, read_stack

    stack = read_stack(args.path)
    if stack is None:
        print(f"no stack recorded under {args.path}")
        return 0
    try:
        os.kill(stack.owner_pid, signal.SIGTERM)  # its owner stops it in order and removes the record
    except ProcessLookupError:
        print(f"the stack's owner (pid {stack.owner_pid}) is gone; its services went with it")
        forget_stack(args.path)
        return 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and read_stack(args.path) is not None:
        time.sleep(0.5)
    print(f"stopped the stack under {args.path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from producer import keys
    from producer.workers import read_workers

    client = _redis(args)
    now = time.time()
    workers = read_workers(client.hgetall(keys.WORKERS_KEY), client.hgetall(keys.WORKER_HEARTBEATS_KEY), now)
    by_id = {w.info.worker_id: w.hostname for w in workers if w.info.worker_id}
    queues = _queues(client)
    leaders = {queue: _leader(client, queue) for queue in queues}
    print("queues")
    rows = []
    for queue in sorted(queues):
        statuses = _recent_statuses(client, queue)
        token, holder = leaders[queue]
        rows.append([queue, by_id.get(holder, holder or "-"), token or "-", _queue_depth(client, queue),
                     statuses.get("running", 0), statuses.get("succeeded", 0), statuses.get("failed", 0)])
    print(_table(["queue", "leader", "token", "waiting", "running", "succeeded", "failed"], rows)
          if rows else "  (none)")

    print("\nworkers")
    rows = []
    for worker in workers:
        info = worker.info
        if not worker.live:
            role = "dead"
        elif leaders.get(info.queue, ("", ""))[1] == info.worker_id:
            role = "leader"
        else:
            role = "standby"
        rows.append([
            worker.hostname, info.queue, role, info.pid, "ready" if info.ready_at else "starting",
            _age(now - info.started_at), _age(now - worker.seen_at) + " ago" if worker.seen_at else "never",
            _group(info),
        ])
    print(_table(["worker", "queue", "role", "pid", "model", "up", "heartbeat", "training"], rows) if rows else "  (none)")

    print("\nmodels")
    rows = []
    for key in sorted(client.scan_iter(match=keys.model_key("*", "*"), count=500)):
        _, _, project, name = key.decode().split(":", 3)
        fields = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        updated = fields.get("updated_at")
        rows.append([f"{project}/{name}", fields.get("base_model", "?"), fields.get("step", "?"),
                     _age(now - float(updated)) + " ago" if updated else "-"])
    print(_table(["model", "base model", "step", "updated"], rows) if rows else "  (none)")
    return 0


def _group(info: WorkerInfo) -> str:
    """Where a trainer worker trains: in its own process, or on a group of ranks over nodes."""
    ranks, nodes = info.ranks, info.nodes
    if ranks == 1 and nodes == 1:
        return "in process"
    return f"{ranks} ranks on {nodes} node{'s' if nodes != 1 else ''}"


def cmd_jobs(args: argparse.Namespace) -> int:
    from producer import keys
    from producer.jobs import JobRecord

    client = _redis(args)
    queues = [args.queue] if args.queue else sorted(_queues(client))
    ids: list[tuple[float, str]] = []
    for queue in queues:
        for job_id, score in client.zrevrange(keys.queue_jobs_key(queue), 0, args.limit - 1, withscores=True):
            ids.append((score, job_id.decode()))
    rows = []
    for _, job_id in sorted(ids, reverse=True)[: args.limit]:
        fields = client.hgetall(keys.job_key(job_id))
        if not fields:
            continue  # expired record
        record = JobRecord.from_hash(job_id, fields)
        waited = (record.started_at or 0) - record.submitted_at if record.started_at else None
        ran = (record.finished_at - record.started_at) if record.finished_at and record.started_at else None
        step = record.outcome.step if record.outcome else None
        rows.append([
            job_id[:12], record.kind, record.status.value, record.model,
            time.strftime("%H:%M:%S", time.localtime(record.submitted_at)) if record.submitted_at else "-",
            "-" if waited is None else f"{waited:.1f}", "-" if ran is None else f"{ran:.1f}",
            "-" if step is None else step, (record.error_type + ": " + record.error)[:60] if record.error else "",
        ])
    print(_table(["job", "kind", "status", "model", "submitted", "wait s", "run s", "step", "error"], rows)
          if rows else "no jobs")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from producer.plot import plot_history

    output = plot_history(args.path, args.output)
    print(output)
    return 0


# -------------------------------------------------------------------- helpers


def _load_example(name: str) -> Any:
    """Import ``examples/{name}.py`` from the source tree (examples are not part of the installed package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"trainq: {path} not found; run the demo from a trainq checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"trainq_examples_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _redis(args: argparse.Namespace) -> Any:
    import redis

    from producer.local_backend import read_stack
    from producer.settings import client_settings

    try:
        url = args.redis_url or client_settings().redis_url
    except ValueError as exc:
        raise SystemExit(f"trainq: {exc}") from None
    if not url:
        stack = read_stack(args.path)
        if stack is None:
            raise SystemExit(f"trainq: no --redis-url (or TRAINQ_REDIS_URL) and no local stack under {args.path}")
        url = stack.redis_url
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"trainq: cannot reach Redis at {_redact(url)}: {exc}") from None
    return client


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return url.replace(parts.password, "***") if parts.password else url


def _queues(client: Any) -> set[str]:
    """Queues with job records, plus those a registered worker serves."""
    from producer import keys
    from producer.workers import read_workers

    found = set()
    prefix, suffix = keys.queue_jobs_key("\0").split("\0")
    for key in client.scan_iter(match=keys.queue_jobs_key("*"), count=500):
        found.add(key.decode()[len(prefix): -len(suffix)])
    for worker in read_workers(client.hgetall(keys.WORKERS_KEY), {}, 0.0):
        found.add(worker.info.queue)
    return found


def _leader(client: Any, queue: str) -> tuple[str, str]:
    """(fencing token, worker id) of the queue's leader; empty strings when none holds the lead."""
    from producer import keys

    holder = client.get(keys.queue_leader_key(queue))
    token, _, worker_id = (holder.decode() if holder else "").partition(" ")
    return token, worker_id


def _queue_depth(client: Any, queue: str) -> int:
    # Celery's Redis transport keeps a queue as a list, plus one list per non-zero priority.
    names = [queue] + [f"{queue}\x06\x16{priority}" for priority in range(1, 10)]
    return sum(int(client.llen(name)) for name in names)


def _recent_statuses(client: Any, queue: str, limit: int = 1000) -> dict[str, int]:
    from producer import keys

    counts: dict[str, int] = {}
    pipe = client.pipeline(transaction=False)
    job_ids = client.zrevrange(keys.queue_jobs_key(queue), 0, limit - 1)
    for job_id in job_ids:
        pipe.hget(keys.job_key(job_id.decode()), "status")
    for status in pipe.execute() if job_ids else []:
        if status is not None:
            counts[status.decode()] = counts.get(status.decode(), 0) + 1
    return counts


def _describe_stack(stack: Any, path: str) -> str:
    from producer._stack_record import STACK_FILE

    return "\n".join([
        f"trainq local stack for {stack.base_model} (pid {stack.owner_pid})",
        f"  inference   {stack.inference_base_url}   api key in {Path(path) / STACK_FILE}",
        f"  redis       {stack.redis_url}",
        f"  metrics     trainer http://127.0.0.1:{stack.metrics_ports.get('trainer')}/metrics, "
        f"inference http://127.0.0.1:{stack.metrics_ports.get('inference')}/metrics",
        f"  logs        {Path(path) / 'logs'}",
        "  use it:     LocalBackend(" + repr(path) + ") in a script reuses this stack",
    ])


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help, description=help)
        command.set_defaults(func=func)
        return command

    def path_arg(command: argparse.ArgumentParser) -> None:
        command.add_argument("--path", default=DEFAULT_PATH, help=f"the local stack's folder (default: {DEFAULT_PATH})")

    def redis_arg(command: argparse.ArgumentParser) -> None:
        command.add_argument("--redis-url", default=None,
                             help="a stack's Redis (default: $TRAINQ_REDIS_URL, else the local stack's)")

    demo = add("demo", "train the yes/no/maybe example on the embedded default with a local stack", cmd_demo)
    path_arg(demo)
    demo.add_argument("--steps", type=int, default=15, help="train steps (default 15)")
    demo.add_argument("--learning-rate", type=float, default=None, help="LoRA learning rate (default: the example's, 1e-3)")
    demo.add_argument("--base-model", default=None, help="another base model (default: the embedded SmolLM2-135M)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="trainer device (default cpu)")
    demo.add_argument("--serial", action="store_true",
                      help="wait for each step before sampling the next (default: sample while the step before trains)")

    up = add("up", "run the local stack (Redis, trainer, inference) in the foreground until Ctrl-C", cmd_up)
    path_arg(up)
    up.add_argument("--base-model", default=None, help="base model (default: trainq/smollm2-135m-instruct)")
    up.add_argument("--inference-port", type=int, default=None, help="port of the OpenAI API (default: a free one)")
    up.add_argument("--api-key", default=None, help="inference API key (default: a random one, in stack.json)")
    up.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="trainer device (default cpu)")

    down = add("down", "stop the local stack running under --path", cmd_down)
    path_arg(down)

    status = add("status", "queues and their leader, workers (leader, standby, dead), registered models", cmd_status)
    path_arg(status)
    redis_arg(status)

    jobs = add("jobs", "recent jobs, newest first", cmd_jobs)
    path_arg(jobs)
    redis_arg(jobs)
    jobs.add_argument("--queue", default=None, help="only this queue (default: all)")
    jobs.add_argument("--limit", type=int, default=20, help="how many (default 20)")

    plot = add("plot", "reward and loss against step from history.jsonl, as a PNG", cmd_plot)
    plot.add_argument("path", help="a model folder (.trainq/PROJECT/models/NAME) or its history.jsonl")
    plot.add_argument("-o", "--output", default=None, help="PNG to write (default: history.png beside the history)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
