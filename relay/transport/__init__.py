"""The transport interface: what workflows and nodes need from a message broker.

Two implementations share these semantics: :mod:`relay.transport.memory` (in-process, the
embedded default) and the pika-based AMQP transport for real deployments. Workflows and
nodes only ever see this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.topology import Topology

CONTENT_TYPE = "application/msgpack"


@dataclass(frozen=True)
class Message:
    """One broker message: body plus the properties an operator sees in the management UI."""

    body: bytes
    type: str
    message_id: str
    correlation_id: str
    user_id: str | None
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: str = CONTENT_TYPE
    expiration_ms: int | None = None
    """Per-message TTL: the broker dead-letters the message (reason ``expired``) if no
    consumer has taken it this many milliseconds after it was queued; None: never."""


@dataclass(frozen=True)
class Delivery:
    """A message handed to a consumer, to be acked, rejected or requeued exactly once."""

    message: Message
    queue: str
    tag: int
    redelivered: bool


class Transport(ABC):
    """A connection to the broker as one user (a site, the aggregator, or a monitor)."""

    user: str

    @abstractmethod
    def declare(self, topology: Topology) -> None:
        """Create the federation's exchanges, queues and bindings (idempotent)."""

    @abstractmethod
    def publish(self, routing_key: str, message: Message, *, exchange: str) -> None:
        """Publish persistently and mandatorily; return once the broker has confirmed it.

        Raises Unroutable when no queue is bound for the key, AccessRefused when
        ``message.user_id`` is not this connection's user, MessageTooLarge past the broker's
        limit.
        """

    @abstractmethod
    def get(self, queue: str, timeout: float = 0.0) -> Delivery | None:
        """The next delivery from ``queue``, waiting up to ``timeout`` seconds; None if none."""

    def hold(self, queue: str) -> None:  # noqa: B027 - only brokers that push need it
        """Stop deliveries from ``queue`` until the next :meth:`get`: the caller is about to
        work for a long time, and nothing may wait unacked meanwhile."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """The message is safely handled; the broker forgets it."""

    @abstractmethod
    def reject(self, delivery: Delivery, reason: str, *, dead_letter_exchange: str) -> None:
        """Refuse a message: it goes to the dead-letter queue carrying ``reason`` in a header."""

    @abstractmethod
    def requeue(self, delivery: Delivery) -> None:
        """Give a message back for redelivery; past the delivery limit it is dead-lettered."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection; unacked deliveries return to their queues."""
