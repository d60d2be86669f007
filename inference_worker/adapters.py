"""Which checkpoints should be served, and keeping vLLM in line with that.

The watcher tells the manager what the stream says (``add``/``remove``); the
supervisor tells it when vLLM has (re)started (``reload_all``). One lock
orders every call into vLLM, so a reload after a restart and a new event
never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from inference_worker.metrics import InferenceMetrics
from inference_worker.vllm_client import AdapterNotFoundError, VLLMClient, VLLMError, VLLMUnavailableError

__all__ = ["Adapter", "AdapterManager"]

log = logging.getLogger(__name__)


@dataclass
class Adapter:
    """One checkpoint to serve as ``name`` (``model@step``)."""

    name: str
    path: str
    model_key: str
    """``project/model``: the metrics label."""
    created_at: float
    live: bool
    """Saved while this worker runs: its checkpoint-to-servable latency is measured."""
    measured: bool = False


class AdapterManager:
    """The adapters that should be loaded (``wanted``) and those vLLM has (``loaded``)."""

    def __init__(self, client: VLLMClient, metrics: InferenceMetrics) -> None:
        self._client = client
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self.wanted: dict[str, Adapter] = {}
        self.loaded: set[str] = set()
        # False until vLLM first answers: a replay at start then only fills ``wanted``
        # instead of trying (and failing) one HTTP call per retained checkpoint.
        self.vllm_ready = False

    async def add(self, adapter: Adapter) -> None:
        """Serve ``adapter``; a name seen before with another checkpoint is replaced in place."""
        async with self._lock:
            previous = self.wanted.get(adapter.name)
            if previous is not None and (previous.path, previous.created_at) == (adapter.path, adapter.created_at):
                return  # the same event read again
            if previous is not None and previous.model_key != adapter.model_key:
                log.warning(
                    "adapter %s of %s replaces the one of %s: adapter names are not per project",
                    adapter.name, adapter.model_key, previous.model_key,
                )
            self.wanted[adapter.name] = adapter
            if self.vllm_ready:
                await self._load(adapter, replace=adapter.name in self.loaded)

    async def remove(self, name: str) -> None:
        """Stop serving ``name``: later requests for it get vLLM's 404."""
        async with self._lock:
            self.wanted.pop(name, None)
            if not self.vllm_ready:
                return
            try:
                await self._client.unload_adapter(name)
            except VLLMUnavailableError:
                log.info("vLLM is down; %s stays unloaded when it is back", name)
            except VLLMError as exc:
                log.error("could not unload %s: %s", name, exc)
            self.loaded.discard(name)
            self._metrics.adapters_loaded.set(len(self.loaded))

    async def reload_all(self) -> None:
        """Load every wanted adapter into a freshly started vLLM (which has none)."""
        async with self._lock:
            self.vllm_ready = True
            self.loaded.clear()
            self._metrics.adapters_loaded.set(0)
            started = time.monotonic()
            for adapter in list(self.wanted.values()):
                await self._load(adapter, replace=False)
            log.info("loaded %d adapters into vLLM in %.2f s", len(self.loaded), time.monotonic() - started)

    def forget_loaded(self) -> None:
        """vLLM died: nothing is loaded any more."""
        self.vllm_ready = False
        self.loaded.clear()
        self._metrics.adapters_loaded.set(0)

    async def _load(self, adapter: Adapter, *, replace: bool) -> None:
        started = time.monotonic()
        try:
            await self._client.load_adapter(adapter.name, adapter.path, replace=replace)
        except VLLMUnavailableError:
            log.info("vLLM is down; %s is loaded when it is back", adapter.name)
            return
        except AdapterNotFoundError:
            log.warning("no adapter at %s any more; not serving %s", adapter.path, adapter.name)
            self.wanted.pop(adapter.name, None)
            return
        except VLLMError as exc:
            log.error("vLLM refused adapter %s (%s): %s", adapter.name, adapter.path, exc)
            return
        self._metrics.adapter_load_duration.observe(time.monotonic() - started)
        self.loaded.add(adapter.name)
        self._metrics.adapters_loaded.set(len(self.loaded))
        log.info("serving %s from %s", adapter.name, adapter.path)
        if adapter.live and not adapter.measured:
            await self._measure_servable(adapter)

    async def _measure_servable(self, adapter: Adapter) -> None:
        """Observe event-to-first-answer; the 1-token request also warms the adapter up."""
        try:
            await self._client.complete_one_token(adapter.name)
        except VLLMError as exc:
            log.warning("loaded %s but its first request failed: %s", adapter.name, exc)
            return
        latency = time.time() - adapter.created_at
        adapter.measured = True
        self._metrics.checkpoint_to_servable.labels(adapter.model_key).observe(max(latency, 0.0))
        log.info("%s servable %.3f s after its checkpoint event", adapter.name, latency)
