"""``python -m inference_worker``: vLLM's OpenAI server plus the checkpoint watcher.

    python -m inference_worker --redis-url URL --base-model MODEL --checkpoint-root DIR \
        [--host H] [--port N] [--api-key KEY] [--metrics-port N] [--vllm-args='...']

Every flag is also a ``TRAINQ_*`` variable (``--api-key`` / ``TRAINQ_API_KEY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from inference_worker.settings import InferenceSettings
from producer.settings import parse_settings

__all__ = ["main", "resolve_model_path", "serve"]

log = logging.getLogger("inference_worker")


def resolve_model_path(base_model: str) -> str:
    """The local folder of ``base_model`` (the embedded default is materialised on first use)."""
    try:
        from producer.base_models import resolve_base_model
    except ImportError:  # the resolver is optional: a plain folder or hub id is used as it is
        return base_model
    return resolve_base_model(base_model)


async def serve(settings: InferenceSettings, model_path: str) -> None:
    """Run vLLM and the watcher until SIGTERM or SIGINT, then stop both (and vLLM's processes)."""
    import prometheus_client

    from inference_worker.adapters import AdapterManager
    from inference_worker.metrics import InferenceMetrics
    from inference_worker.supervisor import VLLMSupervisor
    from inference_worker.vllm_client import VLLMClient
    from inference_worker.watcher import CheckpointWatcher

    # *_created series double the output and no dashboard reads them.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = InferenceMetrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, addr=settings.host)
    client = VLLMClient(f"http://{_connect_host(settings.host)}:{settings.port}", settings.api_key)
    adapters = AdapterManager(client, metrics)
    watcher = CheckpointWatcher(
        settings.redis_url,
        adapters,
        metrics,
        base_models={settings.base_model, model_path},
        checkpoint_root=settings.checkpoint_root,
    )
    supervisor = VLLMSupervisor(
        settings, model_path, client, metrics, on_ready=adapters.reload_all, on_down=adapters.forget_loaded
    )
    tasks = [asyncio.create_task(supervisor.run(), name="supervisor"), asyncio.create_task(watcher.run(), name="watcher")]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        log.info("stopping")
        for task in [*tasks, stopper]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await watcher.aclose()
        await client.aclose()


def _connect_host(host: str) -> str:
    """Where the worker itself reaches vLLM: a wildcard bind is reached on loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(InferenceSettings, argv, prog="python -m inference_worker")
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check otherwise
    model_path = resolve_model_path(settings.base_model)
    log.info("serving base model %s from %s", settings.base_model, model_path)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, model_path))


if __name__ == "__main__":
    main()
