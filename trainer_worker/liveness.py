"""Liveness, in the Celery main process: heartbeat, queue leadership, job leases, the stalled-job check.

A consumer bootstep (``liveness_step``) runs ``Supervisor.tick`` on the worker's
event loop every third of the lease (``tick_s``); each tick is a few short Redis
round trips with small socket timeouts:

- *Heartbeat*: ``keys.WORKER_HEARTBEATS_KEY``; SDK calls read it to know a live
  worker serves a queue (``producer/workers.py``).
- *Leadership* (one writer per queue, and so per model): the leader key
  (``keys.queue_leader_key``, ``"{token} {worker id}"``, expiring after the lease)
  is renewed by its holder; a worker that finds it free takes it, with a new
  fencing token (``INCR keys.queue_token_key``) unless the counter still shows the
  token this same worker held last, so nobody else wrote since. Only the leader
  consumes the queue: every worker starts on the idle queue (``keys.IDLE_QUEUE``)
  and the leader adds its queue to the consumer, after no other worker's job
  lease is live (a leader that lost its lease may still be finishing a step; it is
  fenced out at its commit). Other workers are hot standbys: their training child
  has the model loaded, and they take over within about a lease when the leader dies.
- *Job leases*: for each job this worker holds (Celery's reserved requests), the
  lease ``keys.job_lease_key`` is renewed and the message's score in kombu's
  ``unacked_index`` moved to now (``broker.bump_visibility``), so the visibility
  timeout never hands a live job out again, however long it runs.
- *Stalled-job check* (BullMQ's stalled check, Sidekiq's reliable fetch): on the
  leader, every job of the queue's running set whose lease lapsed has lost its
  worker: its record goes back to ``queued`` and its message back to the front of
  the queue (``broker.requeue_front``), or, when the message is gone, the task is
  sent again with the same id. The running set keeps this O(running jobs).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from producer import keys
from producer._redis import UNREACHABLE
from trainer_worker import broker
from trainer_worker.jobs import REQUEUED_SCRIPT

__all__ = ["Supervisor", "liveness_step", "new_worker_id"]

log = logging.getLogger(__name__)

# KEYS: leader, token counter. ARGV: worker id, lease ms, the token this worker held last ('' if none).
# Returns the token this worker leads with, or nil when another worker leads.
_LEAD_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder then
  local token, who = string.match(holder, '^(%d+) (.+)$')
  if who == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return token
  end
  return false
end
local token = redis.call('GET', KEYS[2])
if ARGV[3] == '' or token ~= ARGV[3] then
  token = tostring(redis.call('INCR', KEYS[2]))
end
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return token
"""

# KEYS: leader. ARGV: worker id. Gives the queue up at once, so a standby need not wait out the lease.
_RESIGN_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and string.match(holder, '^%d+ (.+)$') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: running set. ARGV: worker id, job key prefix, lease key suffix, then the job ids this worker holds.
# Returns {live leases of other workers, {job id, delivery tag, ...} of the stalled jobs}; ended jobs leave the set.
_STALLED_SCRIPT = """
local held = {}
for i = 4, #ARGV do held[ARGV[i]] = true end
local foreign, stalled = 0, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not held[id] then
    local job = ARGV[2] .. id
    local status = redis.call('HGET', job, 'status')
    local holder = redis.call('GET', job .. ARGV[3])
    if status ~= 'queued' and status ~= 'running' then
      redis.call('SREM', KEYS[1], id)
    elseif holder then
      if holder ~= ARGV[1] then foreign = foreign + 1 end
    else
      table.insert(stalled, id)
      table.insert(stalled, redis.call('HGET', job, 'delivery_tag') or '')
    end
  end
end
return {foreign, stalled}
"""

# A message this worker just took: where it is, and a lease until the child claims it.
# KEYS: job, running set, lease. ARGV: job id, delivery tag, worker id, lease ms.
_RECEIVED_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'delivery_tag', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4])
return 1
"""


def new_worker_id(hostname: str) -> str:
    """Unique per process start, so a restarted worker never mistakes its predecessor's leases for its own."""
    return f"{hostname}:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Supervisor:
    """The main process's side of liveness for one worker and its queue (see the module docstring).

    Args:
        client: a synchronous Redis client with small socket timeouts (it runs on the event loop).
        app: the worker's Celery app, to send a job again whose message is lost.
        queue: the queue this worker serves.
        hostname, worker_id: the worker's name and its unique id.
        lease_s: lease of the jobs and of the leadership; ticks run every ``tick_s``.
        tick_s: seconds between ticks (a third of the shorter of the lease and the visibility timeout).
        layout: kombu's key names.
    """

    def __init__(self, client: Any, app: Any, *, queue: str, hostname: str, worker_id: str, lease_s: float,
                 tick_s: float, layout: broker.BrokerLayout) -> None:
        self.client = client
        self.app = app
        self.queue = queue
        self.hostname = hostname
        self.worker_id = worker_id
        self.lease_ms = int(lease_s * 1000)
        self.tick_s = tick_s
        self.layout = layout
        self.token: str | None = None
        self._last_token = ""
        self._consumer: Any = None
        self._consuming = False
        self._said = ""

    # ---------------------------------------------------------------- events

    def attach(self, consumer: Any) -> None:
        """The consumer (re)started: queues and timers are its; leadership is checked at the next tick."""
        self._consumer = consumer
        if self._consuming and self.token is None:
            self._stop_consuming()

    def received(self, job_id: str, delivery_tag: str) -> None:
        """A message was taken from the queue: record where it is and hold it until the child claims it."""
        try:
            self.client.eval(_RECEIVED_SCRIPT, 3, keys.job_key(job_id), keys.queue_running_key(self.queue),
                             keys.job_lease_key(job_id), job_id, delivery_tag, self.worker_id, self.lease_ms)
        except UNREACHABLE as exc:
            log.warning("job %s taken, but Redis is unreachable to say so (%s); its lease follows at the next tick",
                        job_id, exc)

    def resign(self) -> None:
        """Give the queue up at shutdown when no job is held, so a standby takes over at once."""
        if self.token is None or worker_state.reserved_requests:
            return
        try:
            self.client.eval(_RESIGN_SCRIPT, 1, keys.queue_leader_key(self.queue), self.worker_id)
            log.info("%s: gave up the lead of %s", self.hostname, self.queue)
        except UNREACHABLE:
            pass  # the lease lapses by itself
        self.token = None

    def tick(self) -> None:
        """One round: heartbeat, leadership, leases, stalled jobs. Never raises (it runs on the event loop)."""
        try:
            self._tick()
        except UNREACHABLE as exc:
            log.warning("liveness: Redis unreachable (%s); the leases run out in %.0f s unless it comes back",
                        exc, self.lease_ms / 1000)
        except Exception:  # a bug here must not stop the worker's event loop
            log.exception("liveness tick failed")

    # -------------------------------------------------------------- private

    def _tick(self) -> None:
        now = time.time()
        held = {r.id: str(r.message.delivery_tag or "") for r in list(worker_state.reserved_requests)}
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(keys.WORKER_HEARTBEATS_KEY, self.hostname, repr(now))
            pipe.eval(_LEAD_SCRIPT, 2, keys.queue_leader_key(self.queue), keys.queue_token_key(self.queue),
                      self.worker_id, self.lease_ms, self._last_token)
            _, token = pipe.execute()
        self._set_token(token.decode() if isinstance(token, bytes) else token)
        if self.token is None:
            if self._consuming:
                self._stop_consuming()
            return
        self._renew(held, now)
        waiting_on = self._recover_stalled(held)
        if not self._consuming and waiting_on == 0:
            self._start_consuming()

    def _set_token(self, token: str | None) -> None:
        if token is not None and token != self.token:
            log.info("%s: leader of %s (fencing token %s)", self.hostname, self.queue, token)
            self._last_token = token
        elif token is None and self._said != "standby":
            holder = self.client.get(keys.queue_leader_key(self.queue))
            who = holder.decode().split(" ", 1)[-1] if holder else "nobody yet"
            log.info("%s: standby for %s (leader: %s)", self.hostname, self.queue, who)
        self._said = "leader" if token is not None else "standby"
        self.token = token

    def _renew(self, held: Mapping[str, str], now: float) -> None:
        if not held:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in held:
                pipe.set(keys.job_lease_key(job_id), self.worker_id, px=self.lease_ms)
            broker.bump_visibility(pipe, self.layout, [tag for tag in held.values() if tag], now)
            pipe.execute()

    def _recover_stalled(self, held: Mapping[str, str]) -> int:
        """Requeue the queue's stalled jobs; return how many jobs other workers still hold a live lease on."""
        foreign, stalled = self.client.eval(
            _STALLED_SCRIPT, 1, keys.queue_running_key(self.queue), self.worker_id, keys.job_key(""),
            keys.job_lease_key("").removeprefix(keys.job_key("")), *held,
        )
        for job_id, tag in zip(stalled[::2], stalled[1::2], strict=True):
            self._requeue(job_id.decode(), tag.decode())
        return int(foreign)

    def _requeue(self, job_id: str, tag: str) -> None:
        marked = self.client.eval(REQUEUED_SCRIPT, 4, keys.job_key(job_id), keys.job_channel(job_id),
                                  keys.queue_running_key(self.queue), keys.job_lease_key(job_id),
                                  job_id, "", "", repr(time.time()))
        if not marked:
            return  # it ended, or a worker took it up, since the check
        if tag and broker.requeue_front(self.client, self.layout, tag, self.queue):
            log.warning("job %s lost its worker (lease lapsed); back at the front of %s", job_id, self.queue)
            return
        request = self.client.hget(keys.job_key(job_id), "request")
        if request is None:
            log.error("job %s lost its worker and its message, and its record holds no request to send again",
                      job_id)
            return
        self.app.send_task(keys.TASK_TRAIN, args=[request], queue=self.queue, task_id=job_id)
        log.warning("job %s lost its worker and its message (lease lapsed); sent again", job_id)

    def _start_consuming(self) -> None:
        self._consumer.add_task_queue(self.queue)
        self._consuming = True

    def _stop_consuming(self) -> None:
        log.warning("%s: lost the lead of %s; standing by", self.hostname, self.queue)
        self._consumer.cancel_task_queue(self.queue)
        self._consuming = False


def liveness_step(supervisor: Supervisor) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that runs ``supervisor`` on the consumer's timer (the worker's event loop)."""

    class Liveness(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self._timer: Any = None

        def start(self, parent: Any) -> None:
            supervisor.attach(parent)
            supervisor.tick()
            self._timer = parent.timer.call_repeatedly(supervisor.tick_s, supervisor.tick)

        def stop(self, parent: Any) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def shutdown(self, parent: Any) -> None:
            self.stop(parent)
            supervisor.resign()

    return Liveness
