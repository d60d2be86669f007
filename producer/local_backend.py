"""``LocalBackend``: the whole trainq stack on this machine, started on first use.

It is a ``QueueBackend`` whose Redis, trainer worker and inference worker it
starts itself (or finds already running), so local runs take the production
path: every train call is a job on the queue, trained by the same Celery worker
and served by the same vLLM worker as on a GPU box.

What runs where, under ``path`` (default ``.trainq``)::

    stack.json          the running stack: pids, ports, URLs, API key (0600)
    logs/               redis.log, trainer.log, inference.log
    redis/              Redis data (AOF on)
    checkpoints/        {project}/{name}/checkpoints/{step:04d}
    {project}/models/   what model.log writes

A stack recorded in ``stack.json`` whose processes are alive and healthy is
reused, whoever started it (``trainq up`` in another terminal, or an earlier
script); a backend only ever stops the processes it started itself.

This module is the stack's lifecycle; its parts live beside it: ``_stack_record``
(``stack.json``), ``_stack_guard`` (the guard each service runs under),
``_stack_probes`` (readiness) and ``_stack_env`` (ports, binaries, environment).
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from producer._stack_env import child_env, free_port, redis_server_binary, tail
from producer._stack_guard import spawn_guarded, terminate
from producer._stack_probes import inference_ready, redis_ready, stack_alive, trainer_ready
from producer._stack_record import StackInfo, forget_stack, read_stack, write_stack
from producer.defaults import DEFAULT_PATH
from producer.queue_backend import QueueBackend
from producer.settings import client_settings

if TYPE_CHECKING:
    from producer.jobs import TrainJob
    from producer.model import TrainableModel

__all__ = ["CPU_INFERENCE_DEFAULTS", "LocalBackend", "StackInfo", "read_stack"]

# A laptop-sized vLLM: its 4 GiB KV cache default is sized for servers. Flags given win.
# (The trainer picks its CPU micro-batch size itself: trainer_worker/settings.py.)
CPU_INFERENCE_DEFAULTS = {"--kv-cache-gib": "1", "--max-model-len": "4096"}


@dataclass(frozen=True)
class _StackOptions:
    redis_url: str | None
    inference_port: int | None
    api_key: str | None
    device: str
    cache_dir: str | None
    inference_args: list[str]
    trainer_args: list[str]


class LocalBackend(QueueBackend):
    """Run (or reuse) Redis, a trainer worker and an inference worker on this machine.

    Args:
        path: folder of the stack's state, logs, checkpoints and model logs.
        base_model: the base model the workers serve; by default the first
            registered model's. One stack serves one base model.
        redis_url: use this Redis instead of starting one (default: ``$REDIS_URL``
            if set, else a private ``redis-server`` on a free loopback port).
        inference_port: port of the OpenAI-compatible API (default: a free one).
        api_key: the inference API key (default: a random one, kept in ``stack.json``).
        device: ``cpu`` or ``cuda``, for the trainer worker.
        cache_dir: trainq's cache root, where the embedded default model is materialised.
        inference_args: extra ``python -m inference_worker`` flags, e.g. ``["--kv-cache-gib", "2"]``.
        trainer_args: extra ``python -m trainer_worker`` flags.
        startup_timeout: seconds the workers may take to become ready.
        progress: report what is being started on stderr.
        in_process: ART's option; only ``False``: trainq's workers always run as services of their own.
    """

    def __init__(
        self,
        path: str | None = DEFAULT_PATH,
        *,
        base_model: str | None = None,
        redis_url: str | None = None,
        inference_port: int | None = None,
        api_key: str | None = None,
        device: str = "cpu",
        cache_dir: str | None = None,
        inference_args: list[str] | None = None,
        trainer_args: list[str] | None = None,
        startup_timeout: float = 900.0,
        progress: bool = True,
        in_process: bool = False,
    ) -> None:
        if in_process:
            raise ValueError("in_process=True is not supported: trainq's trainer and inference workers are services")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.path = path or DEFAULT_PATH
        self.base_model = base_model
        self.inference_base_url: str | None = None
        self.inference_api_key: str | None = None
        self._options = _StackOptions(
            redis_url=redis_url or client_settings().local_redis_url,
            inference_port=inference_port,
            api_key=api_key,
            device=device,
            cache_dir=cache_dir,
            inference_args=_with_defaults(inference_args, CPU_INFERENCE_DEFAULTS if device == "cpu" else {}),
            trainer_args=list(trainer_args or []),
        )
        self.startup_timeout = startup_timeout
        self.progress = progress
        self.stack: StackInfo | None = None
        self._owned: dict[str, subprocess.Popen[bytes]] = {}
        self.owns_stack = False
        """Whether this backend started the stack (and stops it), rather than reusing another's."""
        self._started_lock = asyncio.Lock()
        self._connected = False

    # ------------------------------------------------------------------ public

    async def start(self, base_model: str | None = None) -> StackInfo:
        """Start or reuse the stack for ``base_model`` (default: the one given at construction)."""
        async with self._started_lock:
            if self.stack is None:
                base_model = self.base_model or base_model
                if base_model is None:
                    raise ValueError("LocalBackend needs a base model: pass base_model= or register a model first")
                self.stack = await self._start_or_reuse(base_model)
                self.base_model = self.stack.base_model
                QueueBackend.__init__(
                    self, self.stack.redis_url, self.stack.inference_base_url, self.stack.api_key, path=self.path
                )
                self._connected = True
            elif base_model is not None and base_model != self.stack.base_model:
                raise ValueError(
                    f"this LocalBackend serves {self.stack.base_model!r}; a model on {base_model!r} "
                    "needs another LocalBackend with its own path"
                )
            return self.stack

    async def _prepare(self, model: TrainableModel) -> None:
        await self.start(model.base_model)

    def job(self, job_id: str) -> TrainJob:
        if not self._connected:
            raise RuntimeError("the local stack is not started: register a model (or await backend.start()) first")
        return super().job(job_id)

    async def close(self) -> None:
        """Close connections and stop the processes this backend started (not reused ones)."""
        if self._connected:
            await super().close()
            self._connected = False
        await asyncio.to_thread(self.stop)

    async def aclose(self) -> None:
        await self.close()

    def stop(self) -> None:
        """Stop the processes this backend started, inference first, Redis last; idempotent."""
        for role in ("inference", "trainer", "redis"):
            process = self._owned.pop(role, None)
            if process is not None:
                self._say(f"stopping {role} (pid {process.pid})")
                terminate(process)
        if self.owns_stack:
            forget_stack(self.path)
        self.owns_stack = False
        self.stack = None

    # ----------------------------------------------------------- stack start

    async def _start_or_reuse(self, base_model: str) -> StackInfo:
        root = Path(self.path)
        (root / "logs").mkdir(parents=True, exist_ok=True)
        # Two backends on one path must not both start a stack: the second waits, then reuses.
        with open(root / ".stack.lock", "w") as lock:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            existing = read_stack(root)
            if existing is not None and await asyncio.to_thread(stack_alive, existing):
                if existing.base_model != base_model:
                    raise ValueError(
                        f"a stack for {existing.base_model!r} already runs under {root} (pid {existing.owner_pid}); "
                        f"use another path for {base_model!r}"
                    )
                self._say(f"reusing the stack under {root} (started by pid {existing.owner_pid})")
                return existing
            atexit.register(self.stop)
            try:
                stack = await self._start_stack(base_model, root)
            except BaseException:
                self.stop()
                raise
            write_stack(root, stack)
            self.owns_stack = True
            return stack

    async def _start_stack(self, base_model: str, root: Path) -> StackInfo:
        started = time.monotonic()
        opts = self._options
        env = child_env(opts.cache_dir)
        self._say(f"starting the local stack under {root} for {base_model}")
        await self._materialise(base_model, env)

        pids: dict[str, int] = {}
        logs = {role: str((root / "logs" / f"{role}.log").resolve()) for role in ("redis", "trainer", "inference")}
        redis_url = opts.redis_url
        if redis_url is None:
            port = free_port()
            redis_dir = root / "redis"
            redis_dir.mkdir(exist_ok=True)
            self._spawn("redis", [
                redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir.resolve()),
                "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
            ], logs["redis"], env)
            redis_url = f"redis://127.0.0.1:{port}/0"
            await self._wait_all({"redis": partial(redis_ready, redis_url)}, 30.0)
        else:
            await self._wait_all({"redis": partial(redis_ready, redis_url)}, 10.0)

        api_key = opts.api_key or secrets.token_urlsafe(24)
        inference_port = opts.inference_port or free_port()
        metrics_ports = {"trainer": free_port(), "inference": free_port()}
        hostname = f"trainer-local-{os.getpid()}-{secrets.token_hex(3)}@{socket.gethostname()}"
        checkpoint_root = str((root / "checkpoints").resolve())
        common = ["--redis-url", redis_url, "--base-model", base_model, "--checkpoint-root", checkpoint_root]
        self._spawn("trainer", [
            sys.executable, "-m", "trainer_worker", *common,
            "--metrics-port", str(metrics_ports["trainer"]), "--device", opts.device, "--hostname", hostname,
            *opts.trainer_args,
        ], logs["trainer"], env)
        self._spawn("inference", [
            sys.executable, "-m", "inference_worker", *common,
            "--host", "127.0.0.1", "--port", str(inference_port),
            "--metrics-port", str(metrics_ports["inference"]), *opts.inference_args,
        ], logs["inference"], {**env, "TRAINQ_API_KEY": api_key})  # the key stays out of `ps`

        inference_base_url = f"http://127.0.0.1:{inference_port}/v1"
        # Both load the model at once; wait for the two together.
        await self._wait_all({
            "trainer worker": partial(trainer_ready, redis_url, hostname),
            "inference worker": partial(inference_ready, inference_base_url, api_key),
        })
        self._say(f"stack ready in {time.monotonic() - started:.0f} s: inference {inference_base_url}, redis {redis_url}")
        pids.update({role: process.pid for role, process in self._owned.items()})
        return StackInfo(
            base_model=base_model,
            redis_url=redis_url,
            inference_base_url=inference_base_url,
            api_key=api_key,
            trainer_hostname=hostname,
            owner_pid=os.getpid(),
            started_at=time.time(),
            pids=pids,
            metrics_ports=metrics_ports,
            logs=logs,
        )

    async def _materialise(self, base_model: str, env: dict[str, str]) -> None:
        """Resolve the base model once, here, so its progress shows in this terminal, not in a log.

        In a child process: this one (a rollout client) never needs torch.
        """
        from producer.base_models import EMBEDDED_DEFAULT

        if base_model != EMBEDDED_DEFAULT:
            return
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "producer.base_models", base_model, *([] if self.progress else ["--quiet"]),
            stdout=subprocess.DEVNULL, env=env,
        )
        if await child.wait() != 0:
            raise RuntimeError(f"could not prepare {base_model} (see the error above)")

    def _spawn(self, role: str, cmd: list[str], log_path: str, env: dict[str, str]) -> None:
        self._say(f"starting {role} (log: {log_path})")
        self._owned[role] = spawn_guarded(cmd, log_path, env)

    async def _wait_all(self, checks: dict[str, Callable[[], bool]], timeout: float | None = None) -> None:
        started = time.monotonic()
        deadline = started + (timeout or self.startup_timeout)
        pending = dict(checks)
        last_note = started
        while pending:
            self._check_children()
            for what, ready in list(pending.items()):
                if await asyncio.to_thread(ready):
                    self._say(f"{what} ready ({time.monotonic() - started:.0f} s)")
                    del pending[what]
            if not pending:
                return
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{', '.join(pending)} not ready after {now - started:.0f} s; see {self.path}/logs/")
            if now - last_note > 15:
                self._say(f"waiting for {', '.join(pending)} ({now - started:.0f} s)")
                last_note = now
            await asyncio.sleep(0.25)

    def _check_children(self) -> None:
        for role, process in self._owned.items():
            if process.poll() is not None:
                log = tail(Path(self.path, "logs", f"{role}.log"))
                raise RuntimeError(f"{role} exited with {process.returncode} while starting; its log ends:\n{log}")

    def _say(self, message: str) -> None:
        if self.progress:
            print(f"trainq: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- helpers


def _with_defaults(args: list[str] | None, defaults: dict[str, str]) -> list[str]:
    """``args`` plus each default flag that ``args`` does not set itself."""
    args = list(args or [])
    given = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
    for flag, value in defaults.items():
        if flag not in given:
            args += [flag, value]
    return args
