"""Sending and receiving whole envelopes over a transport: chunking, checks, dedup, accounting.

:class:`Outbox` cuts a payload into chunks and publishes each with confirm. :class:`Inbox`
turns deliveries back into complete, verified envelopes: it refuses anything malformed,
forged (``user_id`` ≠ sender, or a bad signature) or misaddressed, reassembles chunks on disk,
verifies digests, decrypts sealed payloads and drops duplicates, so a receiver handles each
logical message once. With a :class:`~relay.security.Security` both sign every envelope,
verify every signature, and refuse a signed message published again (a replay).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from relay.chunking import Reassembler, chunk_checksum, split, transfer_key
from relay.codec import Encoding, digest
from relay.envelope import (
    ControlEnvelope,
    Envelope,
    EnvelopeBase,
    EventEnvelope,
    LineageEnvelope,
    ModelEnvelope,
    Task,
    to_wire,
)
from relay.errors import ChunkError, EnvelopeError, InvalidInput
from relay.frame import decode_frame, message_of
from relay.security import Security
from relay.storage import map_file
from relay.topology import Topology, routing_key
from relay.transport import Delivery, Transport

log = logging.getLogger(__name__)

E = TypeVar("E", bound=EnvelopeBase)


@dataclass
class Traffic:
    """What one party has published: messages and body bytes, by message kind.

    A model sent to be scored, not trained, is counted apart: the final model every site
    evaluates as ``model:evaluate``, a ring gate's reference as ``model:reference``.
    """

    messages: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)

    def moved_since(self, before: Mapping[str, int]) -> dict[str, int]:
        """Bytes published since ``before`` (an earlier copy of :attr:`bytes`), by kind, as
        event detail ``bytes:<kind>``."""
        return {
            f"bytes:{kind}": n - before.get(kind, 0)
            for kind, n in self.bytes.items()
            if n > before.get(kind, 0)
        }

    @property
    def total_bytes(self) -> int:
        """All body bytes published."""
        return sum(self.bytes.values())


def sign(envelope: E, security: Security) -> E:
    """``envelope`` with its sender's signature."""
    return envelope.model_copy(update={"signature": security.signature(to_wire(envelope))})


class Outbox:
    """Publishes envelopes for one sender, chunking payloads above the job's chunk size;
    with ``security``, signs every envelope and encrypts payloads where the roster says."""

    def __init__(
        self,
        transport: Transport,
        topology: Topology,
        *,
        sender: str,
        security: Security | None = None,
    ) -> None:
        self.transport = transport
        self.topology = topology
        self.sender = sender
        self.security = security
        self.traffic = Traffic()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrelay-outbox")

    def send(
        self,
        make: Callable[..., E],
        payload: bytes | bytearray | memoryview | Encoding = b"",
        *,
        chunk_size: int,
        expiration_s: float | None = None,
        **fields: Any,
    ) -> E:
        """Build the envelope with ``make(**fields, <payload fields>)`` and publish it.

        Returns the last chunk's envelope, which carries the payload digest (all chunks share
        its message id). Each chunk is confirmed by the broker before the next is published;
        meanwhile a worker thread hashes the payload and, given an :class:`Encoding`, copies
        the tensors in, each chunk going out as soon as its bytes are final. With
        ``expiration_s``, the broker drops each chunk that no consumer takes in that time.
        """
        progress = _Progress()
        security = self.security
        if security is not None and security.should_seal(str(fields["recipient"])):
            if isinstance(payload, Encoding):
                for _ in payload.fill():
                    pass
                payload = payload.payload
            payload, fields["sealed"] = security.seal(
                payload, recipient=str(fields["recipient"]), job_id=str(fields["job_id"])
            )
        if isinstance(payload, Encoding):
            buffer: bytes | bytearray | memoryview = payload.payload
            hashing = self._worker.submit(_fill_and_hash, payload, progress)
        else:
            buffer = payload
            hashing = self._worker.submit(digest, payload)
            progress.advance(len(memoryview(payload).cast("B")))
        chunks = split(buffer, chunk_size)
        size = len(memoryview(buffer).cast("B"))
        envelope: E | None = None
        message_id = fields.pop("message_id", None)
        for index, chunk in enumerate(chunks):
            chunked = len(chunks) > 1
            last = index == len(chunks) - 1
            progress.wait(index * chunk_size + len(chunk))
            envelope = make(
                **fields,
                **({"message_id": message_id} if message_id else {}),
                sender=self.sender,
                payload_digest=hashing.result() if last else None,
                payload_size=size,
                chunk_index=index,
                chunk_count=len(chunks),
                chunk_size=chunk_size if chunked else 0,
                chunk_digest=chunk_checksum(chunk) if chunked else None,
            )
            message_id = envelope.message_id
            if security is not None:
                envelope = sign(envelope, security)
            message = message_of(envelope, chunk)
            if expiration_s is not None:
                message = replace(message, expiration_ms=max(1, round(expiration_s * 1000)))
            topic = envelope.event if isinstance(envelope, EventEnvelope) else str(envelope.kind)
            self.transport.publish(
                routing_key(envelope.recipient, topic),
                message,
                exchange=self.topology.exchange,
            )
            kind = str(envelope.kind)
            if isinstance(envelope, ModelEnvelope) and envelope.task is not Task.TRAIN:
                kind += f":{envelope.task}"
            self.traffic.messages[kind] += 1
            self.traffic.bytes[kind] += len(message.body)
        assert envelope is not None  # split() always yields at least one chunk
        return envelope


class _Progress:
    """How many leading bytes of a payload are final, as a worker thread fills it."""

    def __init__(self) -> None:
        self._final = 0
        self._failed: BaseException | None = None
        self._changed = threading.Condition()

    def advance(self, final: int) -> None:
        with self._changed:
            self._final = final
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self._failed = error
            self._changed.notify_all()

    def wait(self, final: int) -> None:
        """Until the first ``final`` bytes are; re-raises the worker's error."""
        with self._changed:
            self._changed.wait_for(lambda: self._final >= final or self._failed is not None)
            if self._failed is not None:
                raise self._failed


def _fill_and_hash(encoding: Encoding, progress: _Progress) -> str:
    """Copy the tensors in, announcing each final stretch, and hash it behind the sender."""
    sha = hashlib.sha256()
    view = memoryview(encoding.payload)
    hashed = 0
    try:
        for final in encoding.fill():
            progress.advance(final)
            sha.update(view[hashed:final])
            hashed = final
    except BaseException as e:
        progress.fail(e)
        raise
    hexdigest: str = sha.hexdigest()
    return hexdigest


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
    """What makes two messages the same: a copy of a handled one is dropped; a different
    message in the same place (a replay, a second update) is left to the workflows to refuse.

    Only a complete message (or a chunked one's last chunk) carries the payload digest, so an
    exact copy of a chunked message is recognised at its last chunk; its earlier chunks are
    handled as a new transfer's until then, and what they stored is discarded there. (Within
    one process, a copy of any chunk of a handled message is known by its transfer key.)"""
    task = getattr(envelope, "task", None)
    stage = getattr(envelope, "stage", None)
    if isinstance(envelope, ControlEnvelope | EventEnvelope):
        # Each is its own request (cancel, then resume, then cancel again): only a copy of
        # the same message, which keeps its id, is the same.
        stage = envelope.message_id
    # Sealed afresh, a message sent again has other ciphertext: the plaintext's MAC says it
    # is the same (and every chunk carries it).
    content = envelope.sealed.plaintext_mac if envelope.sealed else envelope.payload_digest
    if isinstance(envelope, LineageEnvelope):
        content = envelope.output  # no payload: the step is the model it made
    parts = (
        envelope.job_id,
        envelope.kind,
        envelope.round,
        envelope.hop,
        envelope.sender,
        content,
        task,
        stage,
    )
    return "|".join(str(part) for part in parts)


class Inbox:
    """Turns deliveries addressed to ``owner`` into complete, verified, first-time messages."""

    def __init__(
        self,
        *,
        owner: str,
        spool: Path,
        seen: set[str] | None = None,
        security: Security | None = None,
    ) -> None:
        self.owner = owner
        self.security = security
        self.reassembler = Reassembler(spool / "chunks")
        self._seen: set[str] = set(seen or ())
        self._seen_ids: set[str] = set()
        """Message ids handled since this process started (a replay keeps its signed id)."""
        self._handled_transfers: set[str] = set()
        """Transfer keys of the chunked messages handled since this process started: a copy
        of one of their chunks is a copy, not the start of a transfer no last chunk ends."""

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
        if self.security is not None:
            self.security.verify(to_wire(envelope), envelope.sender)
        if not envelope.is_chunked:
            _verify_whole(envelope, data)  # a copy with other bytes is tampered, not a replay
        copied_chunk = envelope.is_chunked and transfer_key(envelope) in self._handled_transfers
        if copied_chunk or dedup_key(envelope) in self._seen:
            if envelope.is_chunked:
                self.reassembler.discard(transfer_key(envelope))
            replayed = envelope.message_id in self._seen_ids and not delivery.redelivered
            if self.security is not None and replayed:
                # The broker redelivers what it gave out and got back unacked; a handled,
                # signed message arriving anew, same message id, was published again. (A
                # sender that sends a message again after a restart gives it a new id: that
                # copy is dropped quietly below.)
                raise EnvelopeError(
                    f"replayed: {envelope.kind} {envelope.message_id} from {envelope.sender} "
                    f"(job {envelope.job_id}, round {envelope.round}, hop {envelope.hop}) was "
                    "already handled here; this copy was published again (by someone holding "
                    "the sender's broker credentials, or by the sender retrying after a lost "
                    "connection: either way, it is not used twice)"
                )
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
            # The whole message's envelope is its last chunk's, the one with the digest (the
            # last to arrive may be another, after a redelivery).
            whole = envelope.model_copy(
                update={
                    "payload_digest": self.reassembler.payload_digest(transfer_key(envelope)),
                    "chunk_index": envelope.chunk_count - 1,
                }
            )
            received = Received(whole, map_file(path), path)
        else:
            received = Received(envelope, data)
        try:
            return self._opened(received)
        except InvalidInput:
            self.forget(received)
            raise

    def _opened(self, received: Received) -> Received:
        """The message with its payload decrypted, if it was sealed; refuses a plaintext
        payload where the federation encrypts, and a sealed one this party cannot open."""
        envelope = received.envelope
        security = self.security
        if envelope.sealed is None:
            if security is not None and envelope.payload_size and security.should_seal(self.owner):
                raise EnvelopeError(
                    f"envelope.sealed: missing; federation {security.federation!r} encrypts "
                    f"every payload, and {envelope.sender!r} sent this one in the clear"
                )
            return received
        if security is None:
            raise EnvelopeError(
                f"envelope.sealed: the payload is encrypted but {self.owner!r} has no keys; "
                "configure [security] with its provisioned keys and roster"
            )
        plaintext = security.open(
            received.payload, envelope.sealed, sender=envelope.sender, job_id=envelope.job_id
        )
        return Received(envelope, memoryview(plaintext))

    def remember(self, received: Received) -> None:
        """The message is in the journal: drop copies of it from now on, and forget its
        chunked transfer."""
        self._seen.add(dedup_key(received.envelope))
        self._seen_ids.add(received.envelope.message_id)
        if received.envelope.is_chunked:
            self._handled_transfers.add(transfer_key(received.envelope))
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
    if actual != envelope.digest:
        raise ChunkError(
            f"message {envelope.message_id}: payload sha256 {actual[:12]}… differs from the "
            f"header's {envelope.digest[:12]}…; it was corrupted or tampered with"
        )
