"""Names and arguments of a federation's broker topology, shared by every transport.

One topic exchange per federation; a queue per site and one for the aggregator, each bound
by its own routing key; an events queue for ``events.#`` (for one follower, such as ``job
submit --wait``) and an events log, a stream of the same events for any number of watchers; a
dead-letter exchange and queue.
Names explain themselves in the RabbitMQ management UI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.envelope import AGGREGATOR, EVENTS

DELIVERY_LIMIT = 5
"""Redeliveries of one message before the broker dead-letters it (quorum queues count them)."""

EVENTS_MAX_LENGTH = 100_000
"""Events are for watching, not for keeping: the oldest are dropped past this many."""

LOG_MAX_AGE = "7D"
"""How long the events log (a stream) keeps events for ``fedrelay watch`` and ``status``."""

LOG_MAX_BYTES = 1 << 30
"""The events log's size cap; whole segments past it are dropped, oldest first."""

LOG_SEGMENT_BYTES = 8 << 20
"""Retention drops whole segments: small ones let it act on a log of small events."""

REASON_HEADER = "x-fedrelay-reason"
"""Header on a dead-lettered message saying why it was refused."""

ORIGINAL_USER_HEADER = "x-fedrelay-original-user-id"
"""On a dead letter: who published it (RabbitMQ makes the rejecting party republish it)."""


def dead_letter_reason(headers: Mapping[str, Any]) -> str:
    """Why a message was dead-lettered: fedrelay's reason header, or the broker's own
    ``x-death`` reason (``delivery_limit``, ``rejected``, ``expired``, ``maxlen``)."""
    reason = headers.get(REASON_HEADER)
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if isinstance(reason, str):
        return reason
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return f"broker: {deaths[0].get('reason', 'unknown')}"
    return "unknown"


def site_key(site: str) -> str:
    """Routing key of a site's queue."""
    return f"site.{site}"


def event_key(kind: str) -> str:
    """Routing key of an event of ``kind``."""
    return f"{EVENTS}.{kind}"


def routing_key(recipient: str, kind: str) -> str:
    """Routing key for a message to ``recipient`` (a site, the aggregator, or events)."""
    if recipient == AGGREGATOR:
        return AGGREGATOR
    if recipient == EVENTS:
        return event_key(kind)
    return site_key(recipient)


def topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ topic matching: words split by '.', '*' is one word, '#' zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


@dataclass(frozen=True)
class Topology:
    """The exchanges, queues and bindings of one federation."""

    federation: str
    sites: tuple[str, ...]

    @property
    def exchange(self) -> str:
        """The federation's topic exchange."""
        return f"fedrelay.{self.federation}"

    @property
    def dead_letter_exchange(self) -> str:
        """Where refused and over-delivered messages go."""
        return f"fedrelay.{self.federation}.dlx"

    @property
    def dead_queue(self) -> str:
        """The queue an operator inspects for refused messages."""
        return f"fedrelay.{self.federation}.dead"

    @property
    def aggregator_queue(self) -> str:
        """The aggregator's (coordinator's) inbox."""
        return f"fedrelay.{self.federation}.{AGGREGATOR}"

    @property
    def events_queue(self) -> str:
        """Events of every kind, for monitors."""
        return f"fedrelay.{self.federation}.{EVENTS}"

    @property
    def log_queue(self) -> str:
        """The events log: a stream every watcher reads from any point, without consuming."""
        return f"fedrelay.{self.federation}.log"

    def site_queue(self, site: str) -> str:
        """A site's inbox."""
        return f"fedrelay.{self.federation}.site.{site}"

    def queue_of(self, party: str) -> str:
        """The inbox of a site or of the aggregator."""
        return self.aggregator_queue if party == AGGREGATOR else self.site_queue(party)

    def bindings(self) -> list[tuple[str, str]]:
        """(queue, routing-key pattern) pairs bound to the federation exchange."""
        pairs = [(self.site_queue(site), site_key(site)) for site in self.sites]
        pairs.append((self.aggregator_queue, AGGREGATOR))
        pairs.append((self.events_queue, event_key("#")))
        pairs.append((self.log_queue, event_key("#")))
        return pairs

    def queue_arguments(self, queue: str) -> dict[str, Any]:
        """Declaration arguments of one of this federation's queues."""
        if queue == self.dead_queue:
            # Dead letters wait for a person; a quorum queue keeps them through node loss.
            return {"x-queue-type": "quorum"}
        if queue == self.log_queue:
            # A stream: read from its start by any number of watchers, none consuming it (a
            # classic or quorum queue gives each message to one consumer only).
            return {
                "x-queue-type": "stream",
                "x-max-age": LOG_MAX_AGE,
                "x-max-length-bytes": LOG_MAX_BYTES,
                "x-stream-max-segment-size-bytes": LOG_SEGMENT_BYTES,
            }
        if queue == self.events_queue:
            # Classic queue with a cap: events are frequent and losing old ones is harmless.
            return {"x-max-length": EVENTS_MAX_LENGTH, "x-overflow": "drop-head"}
        return {
            # Quorum queues replicate and count deliveries, which the delivery limit needs.
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            # One consumer per site at a time: a second node started for the same site
            # stands by instead of training the same hop twice.
            "x-single-active-consumer": True,
        }

    def queues(self) -> list[str]:
        """Every queue of the federation."""
        return [queue for queue, _ in self.bindings()] + [self.dead_queue]
