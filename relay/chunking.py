"""Chunking: a payload larger than the chunk size travels as numbered chunks.

The sender cuts views (no copies); the receiver writes each chunk at its place in a spool
file on disk, fsyncs it and records it in a small manifest, so that a chunk can be acked as
soon as it is safe and a restarted node keeps what it already received. When the last chunk
lands, the whole payload's sha256 is checked before anything decodes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from relay.envelope import EnvelopeBase
from relay.errors import ChunkError

_READ_BLOCK = 8 * 1024 * 1024


def split(payload: bytes | bytearray | memoryview, chunk_size: int) -> list[memoryview]:
    """Cut a payload into views of at most ``chunk_size`` bytes (one view if it fits)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    view = memoryview(payload).cast("B")
    if len(view) <= chunk_size:
        return [view]
    return [view[i : i + chunk_size] for i in range(0, len(view), chunk_size)]


def chunk_length(envelope: EnvelopeBase) -> int:
    """How many bytes chunk ``envelope.chunk_index`` must hold."""
    if envelope.chunk_count == 1:
        return envelope.payload_size
    if envelope.chunk_index < envelope.chunk_count - 1:
        return envelope.chunk_size
    return envelope.payload_size - envelope.chunk_size * (envelope.chunk_count - 1)


def write_durably(path: Path, data: bytes) -> None:
    """Write a small file so that it survives a crash: temp file, fsync, rename, fsync dir."""
    temp = path.with_suffix(path.suffix + ".tmp")
    with temp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    temp.replace(path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """fsync a directory so that renames and new files in it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            sha.update(block)
    return sha.hexdigest()


@dataclass
class _Transfer:
    payload_digest: str
    payload_size: int
    chunk_count: int
    chunk_size: int
    received: dict[int, str]

    def describe(self) -> dict[str, object]:
        return {
            "payload_digest": self.payload_digest,
            "payload_size": self.payload_size,
            "chunk_count": self.chunk_count,
            "chunk_size": self.chunk_size,
            "received": {str(k): v for k, v in self.received.items()},
        }


class Reassembler:
    """Reassembles chunked payloads on disk, detecting loss, duplicates, mix-ups and corruption.

    One transfer is keyed by the envelope's ``message_id``, which all its chunks share.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._transfers: dict[str, _Transfer] = {}
        for manifest in directory.glob("*.chunks.json"):
            message_id = manifest.name.removesuffix(".chunks.json")
            data = json.loads(manifest.read_text())
            data["received"] = {int(k): v for k, v in data["received"].items()}
            self._transfers[message_id] = _Transfer(**data)

    def _part(self, message_id: str) -> Path:
        return self.directory / f"{message_id}.part"

    def _manifest(self, message_id: str) -> Path:
        return self.directory / f"{message_id}.chunks.json"

    def pending(self) -> dict[str, list[int]]:
        """Incomplete transfers and the chunk indices each still misses."""
        return {mid: self.missing(mid) for mid in self._transfers}

    def missing(self, message_id: str) -> list[int]:
        """Chunk indices not yet received for ``message_id`` (all, if unknown)."""
        transfer = self._transfers.get(message_id)
        if transfer is None:
            return []
        return [i for i in range(transfer.chunk_count) if i not in transfer.received]

    def discard(self, message_id: str) -> None:
        """Forget a transfer and delete what it had on disk."""
        self._transfers.pop(message_id, None)
        self._part(message_id).unlink(missing_ok=True)
        self._manifest(message_id).unlink(missing_ok=True)

    def add(self, envelope: EnvelopeBase, data: memoryview) -> Path | None:
        """Store one chunk durably; return the complete, verified payload file after the last.

        Returns None while chunks are still missing, and for an exact duplicate of a chunk
        already stored. Raises ChunkError for a chunk that is corrupt, of the wrong length,
        inconsistent with the transfer's other chunks, or a different chunk under an index
        already stored; and when the reassembled payload's digest is wrong (the transfer is
        then discarded).
        """
        mid = envelope.message_id
        where = f"chunk {envelope.chunk_index + 1}/{envelope.chunk_count} of message {mid}"
        expected = chunk_length(envelope)
        if len(data) != expected:
            raise ChunkError(f"{where}: holds {len(data)} bytes, expected {expected}")
        chunk_digest = hashlib.sha256(data).hexdigest()
        if chunk_digest != envelope.chunk_digest:
            raise ChunkError(f"{where}: corrupt (sha256 {chunk_digest[:12]}… differs from header)")
        transfer = self._transfers.get(mid)
        if transfer is None:
            transfer = _Transfer(
                envelope.payload_digest,
                envelope.payload_size,
                envelope.chunk_count,
                envelope.chunk_size,
                {},
            )
            self._transfers[mid] = transfer
        else:
            shape = (transfer.payload_digest, transfer.payload_size)
            layout = (transfer.chunk_count, transfer.chunk_size)
            if shape != (envelope.payload_digest, envelope.payload_size) or layout != (
                envelope.chunk_count,
                envelope.chunk_size,
            ):
                raise ChunkError(
                    f"{where}: payload digest/size/chunk layout differ from the transfer's "
                    "earlier chunks; two payloads share one message id"
                )
        seen = transfer.received.get(envelope.chunk_index)
        if seen is not None:
            if seen == chunk_digest:
                return None
            raise ChunkError(f"{where}: a different chunk with this index was already received")
        part = self._part(mid)
        with part.open("r+b" if part.exists() else "wb") as f:
            f.seek(envelope.chunk_index * max(envelope.chunk_size, 0))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        transfer.received[envelope.chunk_index] = chunk_digest
        if len(transfer.received) < transfer.chunk_count:
            write_durably(self._manifest(mid), json.dumps(transfer.describe()).encode())
            return None
        actual = file_digest(part)
        if actual != transfer.payload_digest:
            self.discard(mid)
            raise ChunkError(
                f"message {mid}: reassembled payload has sha256 {actual[:12]}…, header says "
                f"{transfer.payload_digest[:12]}…; the transfer is discarded"
            )
        complete = self.directory / f"{mid}.payload"
        part.replace(complete)
        self._transfers.pop(mid)
        self._manifest(mid).unlink(missing_ok=True)
        fsync_directory(self.directory)
        return complete
