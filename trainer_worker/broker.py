"""kombu's Redis transport as trainq reaches into it: the one module that knows its private layout.

The job lease (``trainer_worker/liveness.py``) keeps a live job's message from being
handed out again, and the stalled-job check puts a dead worker's job back at the
front of its queue. Both touch what kombu keeps of a taken, unacknowledged message
(kombu 5.7, ``kombu/transport/redis.py``):

- ``unacked`` (hash; transport option ``unacked_key``, ``Channel.unacked_key``):
  delivery tag -> the JSON of ``[message, exchange, routing_key]`` (``QoS.append``),
  ``message`` being the payload dict popped from the queue: ``body``, ``headers``
  (``headers["id"]`` is the Celery task id, trainq's job id) and ``properties``
  (``properties["delivery_tag"]``, ``properties["delivery_info"]``).
- ``unacked_index`` (sorted set; ``unacked_index_key``, ``Channel.unacked_index_key``):
  delivery tag -> unix time it was taken. ``QoS.restore_visible`` pushes a message
  back on its queue once that score is older than ``visibility_timeout``;
  ``bump_visibility`` moves the score forward for as long as the job lives.
- A queue is a list: ``Channel._put`` pushes on the left (``LPUSH``), consumers pop
  on the right (``BRPOP``), so the right end is the front. A message of priority 0
  (trainq never sets another) lives in the list named as the queue
  (``Channel._q_for_pri``; other priorities append ``Channel.sep`` and the step).
- ``Channel._do_restore_message``, as ``restore_visible`` calls it
  (``leftmost=False``), sets ``headers["redelivered"]`` and
  ``properties["delivery_info"]["redelivered"]`` and pushes the message, encoded
  with ``kombu.utils.json.dumps``, back at the front (``RPUSH``).
  ``requeue_front`` does the same in one script that first checks the entry is
  still the one read, so it never races ``restore_visible`` into a duplicate.
- Every key carries the transport option ``global_keyprefix`` (empty by default).
- Celery gives the task the message's properties: ``task.request.properties["delivery_tag"]``.

``tests/integration/trainer/test_broker_layout.py`` pins all of it against the
installed kombu, so an upgrade that changes it fails there first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kombu.transport.redis import Channel
from kombu.utils.json import dumps, loads

__all__ = ["BrokerLayout", "bump_visibility", "delivery_tag", "requeue_front"]

# The entry is compared with the one read, so a message kombu restored (or a worker
# acknowledged) in between is left alone: 1 if this call moved it, 0 if not.
_REQUEUE_FRONT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class BrokerLayout:
    """kombu's key names for one Celery app (its broker transport options)."""

    unacked: str
    unacked_index: str
    prefix: str = ""

    @classmethod
    def from_transport_options(cls, options: Mapping[str, Any]) -> BrokerLayout:
        prefix = str(options.get("global_keyprefix", "") or "")
        return cls(
            unacked=prefix + str(options.get("unacked_key", Channel.unacked_key)),
            unacked_index=prefix + str(options.get("unacked_index_key", Channel.unacked_index_key)),
            prefix=prefix,
        )

    def queue_list(self, queue: str) -> str:
        """The list holding ``queue``'s messages of priority 0."""
        return self.prefix + queue


def delivery_tag(properties: Mapping[str, Any] | None) -> str:
    """The delivery tag of the message a task runs for, from ``task.request.properties``; '' if absent."""
    tag = (properties or {}).get("delivery_tag")
    return str(tag) if tag else ""


def bump_visibility(pipe: Any, layout: BrokerLayout, tags: Iterable[str], now: float) -> None:
    """Mark these taken messages as taken ``now`` (only those still taken), so ``restore_visible`` skips them."""
    for tag in tags:
        pipe.zadd(layout.unacked_index, {tag: now}, xx=True)


def requeue_front(client: Any, layout: BrokerLayout, tag: str, queue: str) -> bool:
    """Put a taken message back at the front of ``queue``, as kombu restores one; ``False`` if it is not taken.

    ``client`` is a synchronous redis-py client. The message keeps its delivery tag
    and is marked redelivered.
    """
    entry = client.hget(layout.unacked, tag)
    if entry is None:
        return False
    message, _exchange, _routing_key = loads(entry)
    message.setdefault("headers", {})["redelivered"] = True
    message.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
    moved = client.eval(_REQUEUE_FRONT, 3, layout.unacked, layout.unacked_index, layout.queue_list(queue),
                        tag, entry, dumps(message))
    return bool(moved)
