"""The trainer's Celery app: one queue, one prefork child, one job at a time.

Reliability settings and why:
- prefork with concurrency 1: a killed child is replaced and its job
  redelivered at once (``task_reject_on_worker_lost``); the solo pool would
  wait for the visibility timeout.
- ``task_acks_late``: a job is acknowledged after it ran, so a crash never loses it.
- ``worker_prefetch_multiplier=1``: the worker holds one job, the rest stay in
  Redis in submission order (and can be cancelled there).
- The model and CUDA are set up in the child (``worker_process_init``), never in
  the parent, so a fork never copies a CUDA context.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from producer import keys
from producer.queue import build_celery_app
from trainer_worker.settings import TrainerSettings

if TYPE_CHECKING:
    from trainer_worker.core.trainer import Trainer
    from trainer_worker.group.client import GroupTrainer

log = logging.getLogger(__name__)


class WorkerInfo(msgspec.Struct, kw_only=True):
    """What ``trainq status`` shows of a worker (``keys.WORKERS_KEY``)."""

    base_model: str
    queue: str
    pid: int
    started_at: float
    child_pid: int = 0
    ready_at: float = 0.0
    ranks: int = 1
    """Ranks training the model: 1 in the training child itself, more on a torchrun group."""
    nodes: int = 1
    """Machines of that group."""


@dataclass
class _State:
    settings: TrainerSettings
    base_model_path: str
    hostname: str
    queue: str
    runner: Future = field(default_factory=Future)  # the JobRunner, built in the child


def create_app(settings: TrainerSettings, base_model_path: str) -> tuple[Celery, _State]:
    """The Celery app of one trainer worker; the returned state is filled in the child."""
    queue = keys.queue_name(settings.base_model)
    state = _State(settings, base_model_path, settings.hostname or f"trainer@{socket.gethostname()}", queue)
    app = build_celery_app(settings.redis_url, visibility_timeout_s=settings.visibility_timeout_s)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        task_default_queue=queue,
        # A lost broker connection must not abort a training step; its record is
        # written once Redis is back (see jobs._retry_redis).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Python start-up in a fresh child on a busy machine; the model loads after it (see _init_child).
        worker_proc_alive_timeout=60,
    )

    @app.task(name=keys.TASK_TRAIN)
    def run_job(request: bytes) -> None:
        state.runner.result().run(request)

    _connect_signals(state)
    return app, state


def _connect_signals(state: _State) -> None:
    def announce(**fields: object) -> None:
        import redis

        client = redis.Redis.from_url(state.settings.redis_url)
        current = client.hget(keys.WORKERS_KEY, state.hostname)
        info = msgspec.msgpack.decode(current, type=WorkerInfo) if current else WorkerInfo(
            base_model=state.settings.base_model, queue=state.queue, pid=os.getppid(), started_at=time.time()
        )
        client.hset(keys.WORKERS_KEY, state.hostname, msgspec.msgpack.encode(msgspec.structs.replace(info, **fields)))
        client.close()

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        announce(pid=os.getpid(), started_at=time.time())

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        import redis

        redis.Redis.from_url(state.settings.redis_url).hdel(keys.WORKERS_KEY, state.hostname)

    @worker_process_init.connect(weak=False)
    def _init_child(**_: object) -> None:
        # Loading a model takes seconds to minutes, longer than the pool waits for a
        # new child to report; load beside it, and let the first job wait for it.
        def load() -> None:
            try:
                runner = _build_runner(state)
            except BaseException:
                log.critical("the training child cannot load the model; exiting", exc_info=True)
                os._exit(1)
            state.runner.set_result(runner)
            trainer = runner.trainer
            announce(child_pid=os.getpid(), ready_at=time.time(), ranks=getattr(trainer, "world_size", 1),
                     nodes=getattr(trainer, "nodes", 1))

        threading.Thread(target=load, name="trainq-load-model", daemon=True).start()

    @worker_process_shutdown.connect(weak=False)
    def _child_exit(**_: object) -> None:
        log.info("training child %d exiting", os.getpid())
        if state.runner.done() and not state.runner.exception():
            close = getattr(state.runner.result().trainer, "close", None)
            if close is not None:
                close()  # a training group stops with its child


def _build_runner(state: _State) -> object:
    """Load the model and the trainer in the child: the only place torch meets a device."""
    import redis

    from trainer_worker import metrics
    from trainer_worker.jobs import JobRunner

    settings = state.settings
    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, client, [state.queue])
    trainer: Trainer | GroupTrainer
    if settings.distributed:
        from trainer_worker.group.client import GroupTrainer  # the ranks load torch; this process need not

        trainer = GroupTrainer(settings, state.base_model_path)
    else:
        from trainer_worker.group.launch import build_trainer, group_spec

        trainer = build_trainer(group_spec(settings, state.base_model_path))
        metrics.GROUP_RANKS.set(1)
        metrics.GROUP_NODES.set(1)
    return JobRunner(client, trainer, base_model=settings.base_model, worker_name=state.hostname,
                     max_payload_bytes=settings.max_payload_bytes)
