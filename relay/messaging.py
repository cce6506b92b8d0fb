"""Sending and receiving whole envelopes over a transport: chunking, checks, dedup, accounting.

:class:`Outbox` cuts a payload into chunks and publishes each with confirm. :class:`Inbox`
turns deliveries back into complete, verified envelopes: it refuses anything malformed,
forged (``user_id`` ≠ sender) or misaddressed, reassembles chunks on disk, verifies digests
and drops duplicates, so a receiver handles each logical message once.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from relay.chunking import Reassembler, split, transfer_key
from relay.codec import digest
from relay.envelope import Envelope, EnvelopeBase
from relay.errors import ChunkError, EnvelopeError
from relay.frame import decode_frame, message_of
from relay.storage import map_file
from relay.topology import Topology, routing_key
from relay.transport import Delivery, Transport

log = logging.getLogger(__name__)

E = TypeVar("E", bound=EnvelopeBase)


@dataclass
class Traffic:
    """What one party has published: messages and body bytes, by message kind."""

    messages: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)

    @property
    def total_bytes(self) -> int:
        """All body bytes published."""
        return sum(self.bytes.values())


class Outbox:
    """Publishes envelopes for one sender, chunking payloads above the job's chunk size."""

    def __init__(self, transport: Transport, topology: Topology, *, sender: str) -> None:
        self.transport = transport
        self.topology = topology
        self.sender = sender
        self.traffic = Traffic()

    def send(
        self,
        make: Callable[..., E],
        payload: bytes | bytearray | memoryview = b"",
        *,
        chunk_size: int,
        **fields: Any,
    ) -> E:
        """Build the envelope with ``make(**fields, <payload fields>)`` and publish it.

        Returns the first chunk's envelope (all chunks share its message id). Each chunk is
        confirmed by the broker before the next is published.
        """
        chunks = split(payload, chunk_size)
        whole = digest(payload)
        size = len(memoryview(payload).cast("B"))
        first: E | None = None
        message_id = fields.pop("message_id", None)
        for index, chunk in enumerate(chunks):
            chunked = len(chunks) > 1
            envelope = make(
                **fields,
                **({"message_id": message_id} if message_id else {}),
                sender=self.sender,
                payload_digest=whole,
                payload_size=size,
                chunk_index=index,
                chunk_count=len(chunks),
                chunk_size=chunk_size if chunked else 0,
                chunk_digest=hashlib.sha256(chunk).hexdigest() if chunked else None,
            )
            message_id = envelope.message_id
            message = message_of(envelope, chunk)
            self.transport.publish(
                routing_key(envelope.recipient, str(envelope.kind)),
                message,
                exchange=self.topology.exchange,
            )
            self.traffic.messages[str(envelope.kind)] += 1
            self.traffic.bytes[str(envelope.kind)] += len(message.body)
            first = first or envelope
        assert first is not None  # split() always yields at least one chunk
        return first


@dataclass(frozen=True)
class Received:
    """A complete, verified logical message."""

    envelope: Envelope
    payload: memoryview | mmap.mmap
    path: Path | None = None
    """The spooled payload file of a chunked message, deleted once handled."""


def check_chunking(envelope: Envelope, chunk_size: int) -> None:
    """Refuse a message cut otherwise than its job says: oversize, or foreign chunk sizes."""
    if envelope.is_chunked and envelope.chunk_size != chunk_size:
        raise EnvelopeError(
            f"envelope.chunk_size: got {envelope.chunk_size}, the job's is {chunk_size}"
        )
    if not envelope.is_chunked and envelope.payload_size > chunk_size:
        raise EnvelopeError(
            f"envelope.payload_size: oversize, {envelope.payload_size} bytes in one message; "
            f"the job sends at most {chunk_size} bytes a message, in chunks"
        )


def dedup_key(envelope: Envelope) -> str:
    """What makes two messages the same: a copy of a handled one is dropped."""
    task = getattr(envelope, "task", None)
    stage = getattr(envelope, "stage", None)
    parts = (
        envelope.job_id,
        envelope.kind,
        envelope.round,
        envelope.hop,
        envelope.sender,
        envelope.payload_digest,
        task,
        stage,
    )
    return "|".join(str(part) for part in parts)


class Inbox:
    """Turns deliveries addressed to ``owner`` into complete, verified, first-time messages."""

    def __init__(self, *, owner: str, spool: Path, seen: set[str] | None = None) -> None:
        self.owner = owner
        self.reassembler = Reassembler(spool / "chunks")
        self._seen: set[str] = set(seen or ())

    def receive(
        self, delivery: Delivery, *, screen: Callable[[Envelope], None] | None = None
    ) -> Received | None:
        """Check one delivery; None while chunks are missing or when it is a duplicate.

        ``screen`` checks every envelope, each chunk's included, before anything is stored
        (known job, allowed sender); it raises EnvelopeError to refuse. Raises InvalidInput
        (EnvelopeError, CodecError, ChunkError) for a message that must be dead-lettered; the
        error's text is the reason. A refused chunk discards its whole transfer.
        """
        envelope, data = decode_frame(delivery.message.body)
        user_id = delivery.message.user_id
        if user_id != envelope.sender:
            raise EnvelopeError(
                f"envelope.sender {envelope.sender!r} differs from the broker user_id "
                f"{user_id!r}; a party may only send as itself"
            )
        if envelope.recipient != self.owner:
            raise EnvelopeError(
                f"envelope.recipient is {envelope.recipient!r} but this is {self.owner!r}'s "
                "queue; the sender routed it wrongly"
            )
        if dedup_key(envelope) in self._seen:
            # Before screening: a copy of a job's last message may arrive after the job ended.
            log.info("duplicate %s from %s ignored", envelope.kind, envelope.sender)
            return None
        if screen is not None:
            screen(envelope)
        if envelope.is_chunked:
            try:
                path = self.reassembler.add(envelope, data)
            except ChunkError:
                self.reassembler.discard(transfer_key(envelope))
                raise
            if path is None:
                return None
            received = Received(envelope, map_file(path), path)
        else:
            _verify_whole(envelope, data)
            received = Received(envelope, data)
        return received

    def remember(self, received: Received) -> None:
        """The message is in the journal: drop copies of it from now on, and forget its
        chunked transfer."""
        self._seen.add(dedup_key(received.envelope))
        if received.envelope.is_chunked:
            self.reassembler.release(transfer_key(received.envelope))

    def forget(self, received: Received) -> None:
        """The message was refused: delete what its transfer left on disk."""
        if received.envelope.is_chunked:
            self.reassembler.discard(transfer_key(received.envelope))


def _verify_whole(envelope: Envelope, data: memoryview) -> None:
    if len(data) != envelope.payload_size:
        raise ChunkError(
            f"message {envelope.message_id}: payload holds {len(data)} bytes, "
            f"header says {envelope.payload_size}"
        )
    actual = digest(data)
    if actual != envelope.payload_digest:
        raise ChunkError(
            f"message {envelope.message_id}: payload sha256 {actual[:12]}… differs from the "
            f"header's {envelope.payload_digest[:12]}…; it was corrupted or tampered with"
        )
