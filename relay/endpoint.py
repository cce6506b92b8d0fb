"""An endpoint: one party's consume loop step, shared by sites and the aggregator.

Receive → verify (dead-letter what is invalid, with its reason) → persist to the journal →
hold the queue → ack → act → mark done. The ack comes before acting because acting means
training, which can outlast the broker's consumer timeout; the journal makes that safe, and a
restarted endpoint resumes from it. Actions never see a malformed, forged, misaddressed or
duplicate message.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from relay.envelope import Envelope
from relay.errors import InvalidInput
from relay.journal import MAX_ATTEMPTS, Entry, Journal
from relay.messaging import Inbox, Outbox, Received, dedup_key
from relay.security import Security
from relay.topology import Topology
from relay.transport import Delivery, Transport

log = logging.getLogger(__name__)


Action = Callable[[], None]
"""Work a message asks for (training, aggregation), run after the message is acked."""


class Endpoint(ABC):
    """A site or the aggregator: consumes its own queue, publishes through an outbox."""

    def __init__(
        self,
        *,
        name: str,
        transport: Transport,
        topology: Topology,
        spool: Path,
        queue: str | None = None,
        security: Security | None = None,
    ) -> None:
        self.name = name
        self.transport = transport
        self.topology = topology
        self.spool = spool
        self.queue = queue or topology.queue_of(name)
        self.journal = Journal(spool)
        self.inbox = Inbox(owner=name, spool=spool, seen=self.journal.keys(), security=security)
        self.outbox = Outbox(transport, topology, sender=name, security=security)
        self.rejected: list[str] = []

    def poll(self, timeout: float = 0.0) -> bool:
        """Take and process at most one delivery; True if there was one."""
        delivery = self.transport.get(self.queue, timeout)
        if delivery is None:
            return False
        self.process(delivery)
        return True

    def process(self, delivery: Delivery) -> None:
        """Verify one delivery; persist it, ack it, then act on it (persist, ack, act)."""
        received: Received | None = None
        try:
            received = self.inbox.receive(delivery, screen=self.screen)
            action = self.prepare(received) if received is not None else None
        except InvalidInput as e:
            self.refuse(delivery, str(e))
            if received is not None:
                self.inbox.forget(received)
            return
        entry = None
        if received is not None:
            entry = self.journal.persist(received, dedup_key(received.envelope))
            self.inbox.remember(received)
            self.transport.hold(self.queue)  # before the ack: nothing may queue up meanwhile
        self.transport.ack(delivery)
        if entry is not None:
            self._act(action, entry, delivery.message.message_id)

    def resume(self) -> int:
        """Finish the work of messages acked before a crash or stop; return how many."""
        pending = self.journal.pending()
        for entry, received in pending:
            self._resume_one(entry, received)
        return len(pending)

    def _resume_one(self, entry: Entry, received: Received) -> None:
        envelope = received.envelope
        if entry.key in self.journal.done:  # finished; the crash came before the cleanup
            self.journal.complete(entry)
            return
        if entry.attempts >= MAX_ATTEMPTS:
            reason = (
                f"{envelope.kind} from {envelope.sender} (job {envelope.job_id}, round "
                f"{envelope.round}, hop {envelope.hop}) was started {entry.attempts} times and "
                "never finished; given up (the error is in this node's earlier log)"
            )
            log.error("%s: %s", self.name, reason)
            self.rejected.append(reason)
            self.journal.complete(entry)
            return
        counted = self.journal.attempt(entry, envelope)
        log.warning(
            "%s resumes %s from %s (round %d, hop %d) from its journal",
            self.name,
            envelope.kind,
            envelope.sender,
            envelope.round,
            envelope.hop,
        )
        try:
            action = self.prepare(received)
        except InvalidInput as e:
            log.error("%s drops journalled message %s: %s", self.name, entry.name, e)
            self.rejected.append(str(e))
            self.journal.complete(counted)
            return
        self._act(action, counted, envelope.message_id)

    def _act(self, action: Action | None, entry: Entry, message_id: str) -> None:
        try:
            if action is not None:
                action()
        except InvalidInput as e:
            # Found only while acting (after the ack): nothing to dead-letter any more, so the
            # refusal is logged and kept with the others; the endpoint goes on.
            log.error("%s could not act on message %s: %s", self.name, message_id, e)
            self.rejected.append(str(e))
        # Any other error leaves the message in the journal, to be resumed after a restart.
        self.journal.complete(entry)

    def refuse(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a delivery with its reason and keep going."""
        log.warning(
            "%s dead-letters message %s: %s", self.name, delivery.message.message_id, reason
        )
        self.rejected.append(reason)
        self.transport.reject(
            delivery, reason, dead_letter_exchange=self.topology.dead_letter_exchange
        )

    def screen(self, envelope: Envelope) -> None:  # noqa: B027 - optional hook
        """Cheap checks on every envelope, each chunk's too, before anything is stored.

        Raise EnvelopeError to dead-letter it (an unknown job, a sender with no business
        here, a chunk size other than the job's).
        """

    @abstractmethod
    def prepare(self, received: Received) -> Action | None:
        """Check and decode a complete message; return the work it asks for, done after the ack.

        Raise InvalidInput for a message that must be dead-lettered; return None when there
        is nothing to do.
        """

    def tick(self, now: float) -> float | None:
        """Act on deadlines; return the next deadline (seconds since the epoch) or None."""
        return None

    def close(self) -> None:
        """Close the connection. The spool stays: a restarted endpoint resumes from it."""
        self.transport.close()
