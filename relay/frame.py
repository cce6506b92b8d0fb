"""The wire frame of one message: msgpack envelope header, then the payload as a msgpack bin.

Also the broker properties derived from the envelope, so an operator can read a message's
kind, job, round, hop, sender and chunk position in the management UI without decoding it.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from relay.codec import read_head
from relay.envelope import Envelope, EnvelopeBase, parse_envelope, to_wire
from relay.transport import Message


def encode_frame(envelope: EnvelopeBase, payload: bytes | bytearray | memoryview) -> bytes:
    """Header and payload in one body (the payload is copied once, into the body)."""
    head = msgpack.packb(to_wire(envelope), use_bin_type=True)
    view = memoryview(payload).cast("B")
    return b"".join((head, struct.pack(">BI", 0xC6, len(view)), view))


def decode_frame(body: bytes | bytearray | memoryview) -> tuple[Envelope, memoryview]:
    """Validate the envelope and return it with a view of the payload bytes."""
    head, payload = read_head(body, what="message")
    return parse_envelope(head), payload


def headers_of(envelope: EnvelopeBase) -> dict[str, Any]:
    """Headers shown in the management UI."""
    return {
        "job": envelope.job_id,
        "algorithm": str(envelope.algorithm),
        "round": envelope.round,
        "hop": envelope.hop,
        "sender": envelope.sender,
        "recipient": envelope.recipient,
        "chunk": f"{envelope.chunk_index + 1}/{envelope.chunk_count}",
    }


def message_of(envelope: EnvelopeBase, payload: bytes | bytearray | memoryview) -> Message:
    """The broker message carrying ``envelope`` and its payload (or one chunk of it)."""
    suffix = f".{envelope.chunk_index}" if envelope.is_chunked else ""
    return Message(
        body=encode_frame(envelope, payload),
        type=str(envelope.kind),
        message_id=envelope.message_id + suffix,
        correlation_id=envelope.job_id,
        user_id=envelope.sender,
        headers=headers_of(envelope),
    )
