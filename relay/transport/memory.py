"""In-process transport: a broker in memory with RabbitMQ's semantics.

Topic routing, a queue per site and for the aggregator, mandatory publishes, ``user_id``
checked against the connection's user, a maximum message size, acks, requeues counted
against a delivery limit, dead-lettering with a reason header, and unacked deliveries
returned to their queues when a connection closes. It is what ``fedrelay simulate`` and the
fast tests run on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from relay.errors import AccessRefused, MessageTooLarge, TransportError, Unroutable
from relay.topology import (
    DELIVERY_LIMIT,
    ORIGINAL_USER_HEADER,
    REASON_HEADER,
    Topology,
    topic_matches,
)
from relay.transport import Delivery, Message, Transport

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024
"""RabbitMQ 3.x's default ``max_message_size``."""


@dataclass
class _Queued:
    message: Message
    deliveries: int = 0
    expires_at: float | None = None
    """time.monotonic() after which the broker drops the message unconsumed."""


@dataclass
class _Queue:
    name: str
    arguments: dict[str, Any]
    ready: deque[_Queued]


def _is_stream(arguments: dict[str, Any]) -> bool:
    return arguments.get("x-queue-type") == "stream"


class MemoryBroker:
    """The shared state of an in-process broker; connect to it with :class:`MemoryTransport`."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._lock = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[str, list[tuple[str, str]]] = {}
        self._dead_letter_targets: dict[str, str] = {}
        self._tags = itertools.count(1)

    def declare(self, topology: Topology) -> None:
        """Create the topology's queues and bindings (idempotent)."""
        with self._lock:
            # No streams here: nothing in one process reads the events log, which would only
            # grow.
            streams = {q for q in topology.queues() if _is_stream(topology.queue_arguments(q))}
            for queue in topology.queues():
                if queue not in self._queues and queue not in streams:
                    self._queues[queue] = _Queue(queue, topology.queue_arguments(queue), deque())
            self._bindings[topology.exchange] = [
                (queue, key) for queue, key in topology.bindings() if queue not in streams
            ]
            self._bindings[topology.dead_letter_exchange] = [(topology.dead_queue, "#")]

    def depth(self, queue: str) -> int:
        """Messages ready in ``queue``."""
        with self._lock:
            return len(self._queue(queue).ready)

    def peek(self, queue: str) -> list[Message]:
        """The messages ready in ``queue``, oldest first, without consuming them."""
        with self._lock:
            return [item.message for item in self._queue(queue).ready]

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise TransportError(f"queue {name!r} does not exist; declare the topology first")
        return queue

    def _route(self, exchange: str, routing_key: str, message: Message) -> None:
        bindings = self._bindings.get(exchange)
        if bindings is None:
            raise TransportError(f"exchange {exchange!r} does not exist; declare the topology")
        targets = [q for q, pattern in bindings if topic_matches(pattern, routing_key)]
        if not targets:
            raise Unroutable(
                f"no queue is bound to routing key {routing_key!r} on {exchange!r}; "
                "is the recipient part of the federation?"
            )
        ttl = message.expiration_ms
        expires = None if ttl is None else time.monotonic() + ttl / 1000
        for name in targets:
            self._queues[name].ready.append(_Queued(message, expires_at=expires))
        self._lock.notify_all()

    def _expire(self, queue: _Queue) -> None:
        # As RabbitMQ does: an expired message is dead-lettered when it reaches the head.
        dlx = queue.arguments.get("x-dead-letter-exchange")
        now = time.monotonic()
        while queue.ready and (expires := queue.ready[0].expires_at) is not None and expires < now:
            item = queue.ready.popleft()
            if dlx is not None:
                self._dead_letter(dlx, queue.name, item, "expired", by_broker=True)

    def _dead_letter(
        self, exchange: str, queue: str, item: _Queued, reason: str, *, by_broker: bool = False
    ) -> None:
        headers = dict(item.message.headers)
        headers["x-first-death-queue"] = queue
        if by_broker:  # what RabbitMQ itself writes
            headers["x-first-death-reason"] = reason
            headers["x-death"] = [{"reason": reason, "queue": queue, "count": 1}]
        else:  # what a rejecting fedrelay party writes
            headers[REASON_HEADER] = reason
            headers[ORIGINAL_USER_HEADER] = item.message.user_id or ""
        self._route(exchange, queue, replace(item.message, headers=headers))


class MemoryTransport(Transport):
    """One connection to a :class:`MemoryBroker`, as ``user``."""

    def __init__(self, broker: MemoryBroker, *, user: str) -> None:
        self.broker = broker
        self.user = user
        self._unacked: dict[int, tuple[str, _Queued]] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"connection of {self.user!r} is closed")

    def declare(self, topology: Topology) -> None:
        """Create the topology on the in-memory broker."""
        self._check_open()
        self.broker.declare(topology)

    def publish(self, routing_key: str, message: Message, *, exchange: str) -> None:
        """Route the message to every matching queue, refusing it as RabbitMQ would."""
        self._check_open()
        if message.user_id is not None and message.user_id != self.user:
            raise AccessRefused(
                f"user_id property set to {message.user_id!r} but the connection's user is "
                f"{self.user!r}"
            )
        if len(message.body) > self.broker.max_message_size:
            raise MessageTooLarge(
                f"message of {len(message.body)} bytes exceeds max_message_size "
                f"{self.broker.max_message_size}; lower the job's chunk_size"
            )
        with self.broker._lock:
            self.broker._route(exchange, routing_key, message)

    def get(self, queue: str, timeout: float = 0.0) -> Delivery | None:
        """Take the next ready message, waiting up to ``timeout`` seconds."""
        self._check_open()
        with self.broker._lock:
            source = self.broker._queue(queue)
            self.broker._expire(source)
            if not source.ready and timeout > 0:
                self.broker._lock.wait_for(lambda: bool(source.ready), timeout)
            if not source.ready:
                return None
            item = source.ready.popleft()
            item.deliveries += 1
            tag = next(self.broker._tags)
            self._unacked[tag] = (queue, item)
            return Delivery(item.message, queue, tag, redelivered=item.deliveries > 1)

    def _settle(self, delivery: Delivery) -> tuple[str, _Queued]:
        self._check_open()
        settled = self._unacked.pop(delivery.tag, None)
        if settled is None:
            raise TransportError(
                f"delivery tag {delivery.tag} is unknown or already settled on this connection"
            )
        return settled

    def ack(self, delivery: Delivery) -> None:
        """Forget the message."""
        self._settle(delivery)

    def reject(self, delivery: Delivery, reason: str, *, dead_letter_exchange: str) -> None:
        """Dead-letter the message with ``reason`` in its headers."""
        queue, item = self._settle(delivery)
        with self.broker._lock:
            self.broker._dead_letter(dead_letter_exchange, queue, item, reason)

    def requeue(self, delivery: Delivery) -> None:
        """Return the message to the head of its queue, or dead-letter it past the limit."""
        queue, item = self._settle(delivery)
        with self.broker._lock:
            self._return(queue, item)

    def _return(self, queue: str, item: _Queued) -> None:
        arguments = self.broker._queues[queue].arguments
        limit = arguments.get("x-delivery-limit", DELIVERY_LIMIT)
        dlx = arguments.get("x-dead-letter-exchange")
        if item.deliveries > limit and dlx is not None:
            self.broker._dead_letter(dlx, queue, item, "delivery_limit", by_broker=True)
        else:
            self.broker._queues[queue].ready.appendleft(item)
            self.broker._lock.notify_all()

    def close(self) -> None:
        """Return unacked deliveries to their queues, as a broker does on connection loss."""
        if self._closed:
            return
        with self.broker._lock:
            for queue, item in reversed(list(self._unacked.values())):
                self._return(queue, item)
        self._unacked.clear()
        self._closed = True
