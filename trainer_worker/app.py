"""The trainer's Celery app: one queue, one prefork child, one job at a time, one writer per queue.

Reliability settings and why:
- prefork with concurrency 1: a killed child is replaced and its job
  redelivered at once (``task_reject_on_worker_lost``); the solo pool would
  wait for the visibility timeout.
- ``task_acks_late``: a job is acknowledged after it ran, so a crash never loses it.
- ``worker_prefetch_multiplier=1``: the worker holds one job, the rest stay in
  Redis in submission order (and can be cancelled there).
- The model and CUDA are set up in the child (``worker_process_init``), never in
  the parent, so a fork never copies a CUDA context.
- Liveness lives in the main process (``liveness.py``): a heartbeat, the job
  leases that keep a live job from being handed out again and hand a dead
  worker's job back within about a lease, and the queue's leadership: the worker
  consumes its queue only while it leads it; otherwise it is a hot standby.
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
import redis
from celery import Celery
from celery.exceptions import Reject
from celery.signals import (
    task_received,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from producer import keys
from producer._redis import reply_bytes
from producer.queue import build_celery_app
from producer.workers import WorkerInfo
from trainer_worker import broker
from trainer_worker.jobs import JobRunner, RecordLost
from trainer_worker.liveness import Supervisor, liveness_step, new_worker_id
from trainer_worker.settings import TrainerSettings

if TYPE_CHECKING:
    from trainer_worker.core.trainer import Trainer
    from trainer_worker.group.client import GroupTrainer

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# The main process's Redis calls run on Celery's event loop: they must fail fast, not stall it.
_MAIN_SOCKET_TIMEOUT_S = 2.0


@dataclass
class _State:
    settings: TrainerSettings
    base_model_path: str
    hostname: str
    queue: str
    worker_id: str
    tick_s: float
    layout: broker.BrokerLayout
    runner: Future[JobRunner] = field(default_factory=Future)  # built in the child


def create_app(settings: TrainerSettings, base_model_path: str) -> tuple[Celery, _State]:
    """The Celery app of one trainer worker; the returned state is filled in the child."""
    app = build_celery_app(settings.redis_url, visibility_timeout_s=settings.visibility_timeout_s)
    hostname = settings.hostname or f"trainer@{socket.gethostname()}"
    state = _State(
        settings, base_model_path, hostname, keys.queue_name(settings.base_model), new_worker_id(hostname),
        tick_s=min(settings.lease_s, settings.visibility_timeout_s) / 3,
        layout=broker.BrokerLayout.from_transport_options(app.conf.broker_transport_options),
    )
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        task_default_queue=state.queue,
        # A lost broker connection must not abort a training step; its record is
        # written once Redis is back (see JobRunner's redis_retry_s).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Python start-up in a fresh child on a busy machine; the model loads after it (see _init_child).
        worker_proc_alive_timeout=60,
    )

    @app.task(name=keys.TASK_TRAIN, bind=True)
    def run_job(task: object, request: bytes) -> None:
        try:
            state.runner.result().run(request, broker.delivery_tag(task.request.properties))  # type: ignore[attr-defined]
        except RecordLost as exc:
            log.error("%s", exc)
            raise Reject(str(exc), requeue=True) from exc

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=_MAIN_SOCKET_TIMEOUT_S,
                                  socket_connect_timeout=_MAIN_SOCKET_TIMEOUT_S, client_name="trainq-trainer-main")
    supervisor = Supervisor(client, app, queue=state.queue, hostname=hostname, worker_id=state.worker_id,
                            lease_s=settings.lease_s, tick_s=state.tick_s, layout=state.layout)
    app.steps["consumer"].add(liveness_step(supervisor))
    _connect_signals(state, supervisor)
    return app, state


def _connect_signals(state: _State, supervisor: Supervisor) -> None:
    def announce(**fields: object) -> None:
        """Update this worker's registry entry (the child adds what it knows once the model is loaded)."""
        client = redis.Redis.from_url(state.settings.redis_url)
        current = client.hget(keys.WORKERS_KEY, state.hostname)
        info = msgspec.msgpack.decode(reply_bytes(current), type=WorkerInfo) if current else WorkerInfo(
            base_model=state.settings.base_model, queue=state.queue, pid=os.getppid(), started_at=time.time(),
            worker_id=state.worker_id, heartbeat_s=state.tick_s,
        )
        client.hset(keys.WORKERS_KEY, state.hostname, msgspec.msgpack.encode(msgspec.structs.replace(info, **fields)))
        client.close()

    @worker_init.connect(weak=False)
    def _register(**_: object) -> None:
        # Before the pool forks the child: a fresh entry, so nothing of a previous run of this hostname stays.
        info = WorkerInfo(base_model=state.settings.base_model, queue=state.queue, pid=os.getpid(),
                          started_at=time.time(), worker_id=state.worker_id, heartbeat_s=state.tick_s)
        client = redis.Redis.from_url(state.settings.redis_url)
        with client.pipeline() as pipe:
            pipe.hset(keys.WORKERS_KEY, state.hostname, msgspec.msgpack.encode(info))
            pipe.hset(keys.WORKER_HEARTBEATS_KEY, state.hostname, repr(time.time()))
            pipe.execute()
        client.close()

    @task_received.connect(weak=False)
    def _received(request: object = None, **_: object) -> None:
        message = request.message  # type: ignore[attr-defined]
        supervisor.received(request.id, str(message.delivery_tag or ""))  # type: ignore[attr-defined]

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        client = redis.Redis.from_url(state.settings.redis_url)
        with client.pipeline() as pipe:
            pipe.hdel(keys.WORKERS_KEY, state.hostname)
            pipe.hdel(keys.WORKER_HEARTBEATS_KEY, state.hostname)
            pipe.execute()
        client.close()

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


def _build_runner(state: _State) -> JobRunner:
    """Load the model and the trainer in the child: the only place torch meets a device."""
    from trainer_worker import metrics

    settings = state.settings
    # Generous socket timeout: a job's payload may be hundreds of MB; a hung connection must still end.
    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30, socket_connect_timeout=5,
                                  socket_timeout=120, client_name="trainq-trainer")
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, client, state.queue, state.worker_id)
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
                     worker_id=state.worker_id, max_payload_bytes=settings.max_payload_bytes,
                     max_attempts=settings.max_attempts, lease_s=settings.lease_s,
                     redis_retry_s=settings.redis_retry_s, layout=state.layout)
