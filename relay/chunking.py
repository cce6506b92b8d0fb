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
from typing import Any

from relay.envelope import EnvelopeBase
from relay.errors import ChunkError
from relay.storage import append_line, file_digest, fsync_directory


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


@dataclass
class _Transfer:
    payload_digest: str
    payload_size: int
    chunk_count: int
    chunk_size: int
    received: dict[int, str]
    # The whole payload's sha256 so far, while chunks arrive in order (the usual case): it
    # spares reading the file back. Not kept across restarts; then the file is read.
    running: Any = None
    in_order: int = 0

    def layout(self) -> tuple[str, int, int, int]:
        return (self.payload_digest, self.payload_size, self.chunk_count, self.chunk_size)


def transfer_key(envelope: EnvelopeBase) -> str:
    """A transfer's name: its sender and message id, so senders cannot collide."""
    return f"{envelope.sender}-{envelope.message_id}"


class Reassembler:
    """Reassembles chunked payloads on disk, detecting loss, duplicates, mix-ups and corruption.

    A transfer is keyed by :func:`transfer_key`. Its manifest is an append-only log (a JSON
    layout line, then one ``index digest`` line per stored chunk), so recording a chunk costs
    the same however many came before, and a restarted receiver picks up where it was.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._transfers: dict[str, _Transfer] = {}
        for manifest in directory.glob("*.chunks"):
            self._transfers[manifest.name.removesuffix(".chunks")] = _load(manifest)

    def _part(self, key: str) -> Path:
        return self.directory / f"{key}.part"

    def _manifest(self, key: str) -> Path:
        return self.directory / f"{key}.chunks"

    def pending(self) -> dict[str, list[int]]:
        """Incomplete transfers and the chunk indices each still misses."""
        return {key: missing for key in self._transfers if (missing := self.missing(key))}

    def missing(self, key: str) -> list[int]:
        """Chunk indices not yet received for transfer ``key`` ([] if there is none)."""
        transfer = self._transfers.get(key)
        if transfer is None:
            return []
        return [i for i in range(transfer.chunk_count) if i not in transfer.received]

    def discard(self, key: str) -> None:
        """Forget a transfer and delete what it had on disk."""
        self.release(key)
        self._part(key).unlink(missing_ok=True)

    def add(self, envelope: EnvelopeBase, data: memoryview) -> Path | None:
        """Store one chunk durably; return the complete, verified payload file after the last.

        Returns None while chunks are still missing, and for an exact duplicate of a chunk
        already stored. Raises ChunkError for a chunk that is corrupt, of the wrong length,
        inconsistent with the transfer's other chunks, or a different chunk under an index
        already stored; when the reassembled payload's digest is wrong; and when the spool
        cannot be written. The transfer is discarded in the last two cases.
        """
        key = transfer_key(envelope)
        where = (
            f"chunk {envelope.chunk_index + 1}/{envelope.chunk_count} of message "
            f"{envelope.message_id} from {envelope.sender}"
        )
        expected = chunk_length(envelope)
        if len(data) != expected:
            raise ChunkError(f"{where}: holds {len(data)} bytes, expected {expected}")
        chunk_digest = hashlib.sha256(data).hexdigest()
        if chunk_digest != envelope.chunk_digest:
            raise ChunkError(f"{where}: corrupt (sha256 {chunk_digest[:12]}… differs from header)")
        layout = (
            envelope.payload_digest,
            envelope.payload_size,
            envelope.chunk_count,
            envelope.chunk_size,
        )
        transfer = self._transfers.get(key)
        if (
            transfer is not None
            and len(transfer.received) == transfer.chunk_count
            and self._complete(key).exists()
        ):
            return self._complete(key)  # completed before a crash; a chunk came again
        if transfer is not None and transfer.layout() != layout:
            raise ChunkError(
                f"{where}: payload digest/size/chunk layout differ from the transfer's "
                "earlier chunks; two payloads share one message id"
            )
        if transfer is not None and envelope.chunk_index in transfer.received:
            if transfer.received[envelope.chunk_index] == chunk_digest:
                return None
            raise ChunkError(f"{where}: a different chunk with this index was already received")
        try:
            return self._store(key, transfer, layout, (envelope.chunk_index, chunk_digest), data)
        except OSError as e:
            self.discard(key)
            raise ChunkError(f"{where}: cannot be written to the spool ({e})") from e

    def _store(
        self,
        key: str,
        transfer: _Transfer | None,
        layout: tuple[str, int, int, int],
        chunk: tuple[int, str],
        data: memoryview,
    ) -> Path | None:
        index, chunk_digest = chunk
        if transfer is None:
            transfer = _Transfer(*layout, received={}, running=hashlib.sha256())
            self._transfers[key] = transfer
            header = {
                "payload_digest": layout[0],
                "payload_size": layout[1],
                "chunk_count": layout[2],
                "chunk_size": layout[3],
            }
            append_line(self._manifest(key), json.dumps(header))
        part = self._part(key)
        with part.open("r+b" if part.exists() else "wb") as f:
            f.seek(index * transfer.chunk_size)
            f.write(data)
            f.flush()
            os.fdatasync(f.fileno())  # data and size; mtime need not be durable
        append_line(self._manifest(key), f"{index} {chunk_digest}")
        transfer.received[index] = chunk_digest
        if transfer.running is not None and index == transfer.in_order:
            transfer.running.update(data)
            transfer.in_order += 1
        if len(transfer.received) < transfer.chunk_count:
            return None
        if transfer.running is not None and transfer.in_order == transfer.chunk_count:
            actual = transfer.running.hexdigest()
        else:
            actual = file_digest(part)
        if actual != transfer.payload_digest:
            self.discard(key)
            raise ChunkError(
                f"message {key}: reassembled payload has sha256 {actual[:12]}…, header says "
                f"{transfer.payload_digest[:12]}…; the transfer is discarded"
            )
        complete = self._complete(key)
        part.replace(complete)
        fsync_directory(self.directory)
        # The manifest stays until release(): until the payload is safe elsewhere, a crash
        # must leave a transfer that a redelivered last chunk completes again.
        return complete

    def _complete(self, key: str) -> Path:
        return self.directory / f"{key}.payload"

    def release(self, key: str) -> None:
        """The complete payload is safe elsewhere (or refused): forget the transfer."""
        self._transfers.pop(key, None)
        self._manifest(key).unlink(missing_ok=True)
        self._complete(key).unlink(missing_ok=True)


def _load(manifest: Path) -> _Transfer:
    lines = manifest.read_text().splitlines()
    header = json.loads(lines[0])
    received: dict[int, str] = {}
    for line in lines[1:]:
        index, _, digest = line.partition(" ")
        if index.isdigit() and len(digest) == 64:  # a torn last line is a chunk not recorded
            received[int(index)] = digest
    return _Transfer(received=received, **header)
