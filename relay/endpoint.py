"""An endpoint: one party's consume loop step, shared by sites and the aggregator.

Receive → verify (dead-letter what is invalid, with its reason) → persist to the journal →
hold the queue → ack → act → mark done. The ack comes before acting because acting means
training, which can outlast the broker's consumer timeout; the journal makes that safe, and a
restarted endpoint resumes from it. Actions never see a malformed, forged, misaddressed or
duplicate message.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import ValidationError

from relay.envelope import EVENTS, Detail, Envelope, EventEnvelope
from relay.errors import FedrelayError, InvalidInput
from relay.jobspec import MAX_CHUNK_SIZE, Algorithm
from relay.journal import MAX_ATTEMPTS, Entry, Journal, SpoolFull
from relay.messaging import Inbox, Outbox, Received, dedup_key
from relay.security import Security
from relay.topology import Topology
from relay.transport import Delivery, Transport

log = logging.getLogger(__name__)


NO_JOB = "-"
"""The job id of an event about no job."""

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

Action = Callable[[], None]
"""Work a message asks for (training, aggregation), run after the message is acked."""


def _text(value: object) -> str:
    """A broker property as text. Whoever published a message chose its properties: a raw
    AMQP client may set them to bytes that are not UTF-8 (pika then hands over bytes), or
    leave them out."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else ""


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
        """Take and process at most one delivery; True if there was one. SpoolFull, before
        anything is taken, when the spool's disk has no room for another message."""
        self.journal.check_space()
        delivery = self.transport.get(self.queue, timeout)
        if delivery is None:
            return False
        self.process(delivery)
        return True

    def process(self, delivery: Delivery) -> None:
        """Verify one delivery; persist it, ack it, then act on it (persist, ack, act).

        SpoolFull if a write fails for want of space: the endpoint must stop. The delivery,
        unless it was persisted and acked, goes back to the queue when the connection closes.
        """
        with self.journal.writing():
            self._process(delivery)

    def _process(self, delivery: Delivery) -> None:
        received: Received | None = None
        try:
            received = self.inbox.receive(delivery, screen=self.screen)
            action = self.prepare(received) if received is not None else None
        except InvalidInput as e:
            self.refuse(delivery, str(e))
            if received is not None:
                self.inbox.forget(received)
            return
        if received is None:  # a chunk stored, or a copy of what was handled
            self.transport.ack(delivery)
            return
        entry = self.journal.persist(received, dedup_key(received.envelope))
        self.inbox.remember(received)
        self.transport.hold(self.queue)  # before the ack: nothing may queue up meanwhile
        self.transport.ack(delivery)
        self._act(action, entry, received)

    def resume(self) -> int:
        """Finish the work of messages acked before a crash or stop; return how many."""
        pending = self.journal.pending()
        if pending:
            self.journal.check_space()  # before a start is counted against any of them
        with self.journal.writing():
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
            self.emit("error", job_id=envelope.job_id, reason=reason)
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
            # Acked before the restart, it cannot be dead-lettered: the event is the only
            # trace a watcher sees (a job whose message this was would otherwise just stall).
            self.emit(
                "error",
                job_id=envelope.job_id,
                reason=f"dropped after a restart: {e}"[:4000],
                message_id=envelope.message_id,
            )
            self.journal.complete(counted)
            return
        self._act(action, counted, received)

    def _act(self, action: Action | None, entry: Entry, received: Received) -> None:
        message_id = received.envelope.message_id
        try:
            if action is not None:
                with self.journal.writing():
                    action()
        except SpoolFull:
            self.journal.uncount(entry, received.envelope)
            raise
        except InvalidInput as e:
            # Found only while acting (after the ack): nothing to dead-letter any more, so the
            # refusal is logged and kept with the others; the endpoint goes on.
            log.error("%s could not act on message %s: %s", self.name, message_id, e)
            self.rejected.append(str(e))
            self.emit("error", reason=str(e)[:4000], message_id=message_id)
        # Any other error leaves the message in the journal, to be resumed after a restart.
        self.acted()
        self.journal.complete(entry)

    def refuse(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a delivery with its reason and keep going."""
        message = delivery.message
        log.warning("%s dead-letters message %s: %s", self.name, message.message_id, reason)
        self.rejected.append(reason)
        self.transport.reject(
            delivery, reason, dead_letter_exchange=self.topology.dead_letter_exchange
        )
        correlation = _text(message.correlation_id)
        self.emit(
            "rejected",
            job_id=correlation if JOB_ID.fullmatch(correlation) else NO_JOB,
            reason=reason[:4000],
            message_id=_text(message.message_id)[:64],
            kind=_text(message.type)[:64],
            published_by=_text(message.user_id)[:64],
            queue=delivery.queue,
        )

    def emit(
        self,
        event: str,
        *,
        job_id: str = "",
        algorithm: Algorithm | None = None,
        facts: Mapping[str, Detail] | None = None,
        **detail: Detail,
    ) -> None:
        """Publish an event for whoever watches (``events.<event>``), its detail ``facts``
        and the keywords. Events are for people: failing to publish one is logged and never
        stops the work."""
        detail = {**(facts or {}), **detail}
        try:
            self.outbox.send(
                EventEnvelope,
                chunk_size=MAX_CHUNK_SIZE,  # an event has no payload: one message
                job_id=job_id or NO_JOB,
                algorithm=algorithm,
                recipient=EVENTS,
                event=event,
                detail=detail,
            )
        except (FedrelayError, ValidationError) as e:
            log.warning("%s could not publish event %s: %s", self.name, event, e)

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

    def drop_transfers(self, job_id: str) -> None:
        """The job is over here: delete its chunked messages that never completed."""
        dropped = self.inbox.reassembler.discard_job(job_id)
        if dropped:
            log.info("%s deletes %d unfinished transfer(s) of job %s", self.name, dropped, job_id)

    def acted(self) -> None:  # noqa: B027 - optional hook
        """Called after a message's work is done, before the journal forgets the message:
        an endpoint with state of its own makes it durable here."""

    def tick(self, now: float) -> float | None:
        """Act on deadlines; return the next deadline (seconds since the epoch) or None."""
        return None

    def close(self) -> None:
        """Close the connection. The spool stays: a restarted endpoint resumes from it."""
        self.transport.close()
