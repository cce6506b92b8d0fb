"""Chunking: a payload larger than the chunk size travels as numbered chunks.

The sender cuts views (no copies); the receiver writes each chunk at its place in a spool
file on disk, fsyncs it and records it in a small manifest, so that a chunk can be acked as
soon as it is safe and a restarted node keeps what it already received. When the last chunk
lands, the whole payload's sha256 is checked before anything decodes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from relay.envelope import EnvelopeBase
from relay.errors import ChunkError
from relay.storage import NO_SPACE, append_line, file_digest, fsync_directory

log = logging.getLogger(__name__)


def split(payload: bytes | bytearray | memoryview, chunk_size: int) -> list[memoryview]:
    """Cut a payload into views of at most ``chunk_size`` bytes (one view if it fits)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    view = memoryview(payload).cast("B")
    if len(view) <= chunk_size:
        return [view]
    return [view[i : i + chunk_size] for i in range(0, len(view), chunk_size)]


def chunk_checksum(chunk: bytes | bytearray | memoryview) -> str:
    """A chunk's checksum (xxh3-128, hex): it tells a damaged or different chunk from an exact
    copy at a fraction of sha256's cost. Integrity rests on the whole payload's sha256."""
    return xxhash.xxh3_128_hexdigest(chunk)


def chunk_length(envelope: EnvelopeBase) -> int:
    """How many bytes chunk ``envelope.chunk_index`` must hold."""
    if envelope.chunk_count == 1:
        return envelope.payload_size
    if envelope.chunk_index < envelope.chunk_count - 1:
        return envelope.chunk_size
    return envelope.payload_size - envelope.chunk_size * (envelope.chunk_count - 1)


@dataclass
class _Transfer:
    slot: str
    payload_size: int
    chunk_count: int
    chunk_size: int
    received: dict[int, str]
    payload_digest: str | None = None  # from the last chunk, once it is stored
    # The whole payload's sha256 so far, while chunks arrive in order (the usual case): it
    # spares reading the file back. Not kept across restarts; then the file is read. It is
    # fed on a worker thread, after the chunk's ack, while the next chunk is on its way.
    running: Any = None
    in_order: int = 0
    hashed: Future[None] | None = None

    def layout(self) -> tuple[str, int, int, int]:
        return (self.slot, self.payload_size, self.chunk_count, self.chunk_size)

    @property
    def complete(self) -> bool:
        return len(self.received) == self.chunk_count


def transfer_key(envelope: EnvelopeBase) -> str:
    """A transfer's name: its sender and message id, so senders cannot collide."""
    return f"{envelope.sender}-{envelope.message_id}"


def _layout(envelope: EnvelopeBase) -> tuple[str, int, int, int]:
    # What every chunk of one message must agree on: the message it belongs to, and its cut.
    slot = "|".join(
        str(part)
        for part in (
            envelope.kind,
            envelope.job_id,
            envelope.round,
            envelope.hop,
            envelope.recipient,
            getattr(envelope, "task", None),
            getattr(envelope, "sample_count", None),
        )
    )
    return (slot, envelope.payload_size, envelope.chunk_count, envelope.chunk_size)


class Reassembler:
    """Reassembles chunked payloads on disk, detecting loss, duplicates, mix-ups and corruption.

    A transfer is keyed by :func:`transfer_key`. Its manifest is an append-only log (a JSON
    layout line, then one ``index checksum`` line per stored chunk and a ``sha256 digest``
    line with the last chunk), so recording a chunk costs the same however many came before,
    and a restarted receiver picks up where it was.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._transfers: dict[str, _Transfer] = {}
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrelay-sha256")
        for manifest in directory.glob("*.chunks"):
            key = manifest.name.removesuffix(".chunks")
            records = _trim_torn_tail(manifest)
            if records is None:
                # Torn while its first chunk was being stored, before that chunk's ack: the
                # broker delivers the chunk again and the transfer starts afresh.
                log.warning("spool manifest %s was torn before its first record", manifest)
                manifest.unlink()
                continue
            try:
                self._transfers[key] = _load(records)
            except (ValueError, TypeError, KeyError) as e:
                # Not ours to guess at (another version's layout?): kept aside, never lost.
                aside = manifest.with_suffix(".unreadable")
                manifest.replace(aside)
                log.error(
                    "spool manifest %s is unreadable (%s); moved to %s with its part file "
                    "left in place; its chunks must be sent again",
                    manifest,
                    e,
                    aside.name,
                )

    def _part(self, key: str) -> Path:
        return self.directory / f"{key}.part"

    def _manifest(self, key: str) -> Path:
        return self.directory / f"{key}.chunks"

    def _complete(self, key: str) -> Path:
        return self.directory / f"{key}.payload"

    def payload_digest(self, key: str) -> str:
        """The sha256 a complete transfer was verified against."""
        transfer = self._transfers.get(key)
        if transfer is None or transfer.payload_digest is None:
            raise ChunkError(f"message {key}: no complete transfer")
        return transfer.payload_digest

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

    def discard_job(self, job_id: str) -> int:
        """Delete the incomplete transfers of a job that is over here; return how many. A
        sender killed mid-message sends it again whole, under a new message id: the first
        copy's chunks would otherwise stay on disk for good."""
        stale = [
            key
            for key, transfer in self._transfers.items()
            if not transfer.complete and transfer.slot.split("|")[1] == job_id
        ]
        for key in stale:
            self.discard(key)
        return len(stale)

    def release(self, key: str) -> None:
        """The complete payload is safe elsewhere (or refused): forget the transfer."""
        self._transfers.pop(key, None)
        self._manifest(key).unlink(missing_ok=True)
        self._complete(key).unlink(missing_ok=True)

    def add(self, envelope: EnvelopeBase, data: memoryview) -> Path | None:
        """Store one chunk durably; return the complete, verified payload file after the last.

        Returns None while chunks are still missing, and for an exact duplicate of a chunk
        already stored. Raises ChunkError for a chunk that is corrupt, of the wrong length,
        inconsistent with the transfer's other chunks, or a different chunk under an index
        already stored; when the reassembled payload's digest is wrong; and when the spool
        cannot be written. The transfer is discarded in the last two cases, except for a
        disk without space (:data:`relay.storage.NO_SPACE`): that OSError is raised as it is
        and the chunks already stored are kept.
        """
        key = transfer_key(envelope)
        where = (
            f"chunk {envelope.chunk_index + 1}/{envelope.chunk_count} of message "
            f"{envelope.message_id} from {envelope.sender}"
        )
        expected = chunk_length(envelope)
        if len(data) != expected:
            raise ChunkError(f"{where}: holds {len(data)} bytes, expected {expected}")
        checksum = chunk_checksum(data)
        if checksum != envelope.chunk_digest:
            raise ChunkError(
                f"{where}: corrupt (checksum {checksum[:12]}… differs from the header's)"
            )
        layout = _layout(envelope)
        transfer = self._transfers.get(key)
        if transfer is not None:
            digests = {transfer.payload_digest, envelope.payload_digest} - {None}
            if transfer.layout() != layout or len(digests) > 1:
                raise ChunkError(
                    f"{where}: its message, payload digest, size or chunk layout differ from "
                    "the transfer's earlier chunks; two payloads share one message id"
                )
        try:
            if transfer is not None and envelope.chunk_index in transfer.received:
                if transfer.received[envelope.chunk_index] != checksum:
                    raise ChunkError(
                        f"{where}: a different chunk with this index was already received"
                    )
                # A redelivery: the crash that caused it may have come between recording
                # the last chunk and finishing, or torn the digest's line away.
                if transfer.payload_digest is None and envelope.payload_digest is not None:
                    append_line(self._manifest(key), f"sha256 {envelope.payload_digest}")
                    transfer.payload_digest = envelope.payload_digest
                if not transfer.complete:
                    return None
                if self._complete(key).exists():
                    return self._complete(key)
                return self._finish(key, transfer)
            return self._store(key, (transfer, layout), envelope, checksum, data)
        except OSError as e:
            if e.errno in NO_SPACE:
                # Not the chunk's fault: what is stored stays (a torn record is cut off when
                # the restarted node reloads the manifest), and the node stops (SpoolFull).
                raise
            self.discard(key)
            raise ChunkError(f"{where}: cannot be written to the spool ({e})") from e

    def _store(
        self,
        key: str,
        known: tuple[_Transfer | None, tuple[str, int, int, int]],
        envelope: EnvelopeBase,
        checksum: str,
        data: memoryview,
    ) -> Path | None:
        transfer, layout = known
        index = envelope.chunk_index
        records = []
        if transfer is None:
            transfer = _Transfer(*layout, received={}, running=hashlib.sha256())
            self._transfers[key] = transfer
            header = dict(zip(_HEADER, layout, strict=True))
            records.append(json.dumps(header))
        part = self._part(key)
        with part.open("r+b" if part.exists() else "wb") as f:
            f.seek(index * transfer.chunk_size)
            f.write(data)
            f.flush()
            os.fdatasync(f.fileno())  # data and size; mtime need not be durable
        # A new manifest's directory fsync comes after the part file exists: it makes both
        # names durable at once.
        if envelope.payload_digest is not None:
            records.append(f"sha256 {envelope.payload_digest}")
        records.append(f"{index} {checksum}")
        append_line(self._manifest(key), "\n".join(records))
        transfer.received[index] = checksum
        transfer.payload_digest = transfer.payload_digest or envelope.payload_digest
        if transfer.running is not None and index == transfer.in_order:
            # One worker: updates run in the order they are submitted. hashlib releases the
            # GIL, so this thread goes on to ack the chunk and take the next.
            transfer.hashed = self._hasher.submit(transfer.running.update, data)
            transfer.in_order += 1
        if not transfer.complete:
            return None
        return self._finish(key, transfer)

    def _finish(self, key: str, transfer: _Transfer) -> Path:
        """Verify the whole payload against the last chunk's digest; move it into place."""
        part = self._part(key)
        if transfer.running is not None and transfer.in_order == transfer.chunk_count:
            if transfer.hashed is not None:
                transfer.hashed.result()
            actual = transfer.running.hexdigest()
        else:
            actual = file_digest(part)
        expected = transfer.payload_digest
        if actual != expected:
            self.discard(key)
            raise ChunkError(
                f"message {key}: reassembled payload has sha256 {actual[:12]}…, the last "
                f"chunk says {str(expected)[:12]}…; the transfer is discarded"
            )
        complete = self._complete(key)
        part.replace(complete)
        fsync_directory(self.directory)
        # The manifest stays until release(): until the payload is safe elsewhere, a crash
        # must leave a transfer that a redelivered last chunk completes again.
        return complete


_HEADER = ("slot", "payload_size", "chunk_count", "chunk_size")


def _trim_torn_tail(manifest: Path) -> bytes | None:
    """Cut a record torn by a crash (never acked, so it comes again) off the manifest's end,
    so the next record starts on a line of its own; return the whole records. None if not
    even the header survived."""
    data = manifest.read_bytes()
    if data.endswith(b"\n"):
        return data
    keep = data.rfind(b"\n") + 1
    if keep == 0:
        return None
    with manifest.open("r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fdatasync(f.fileno())
    return data[:keep]


def _load(records: bytes) -> _Transfer:
    lines = records.decode().splitlines()
    header = json.loads(lines[0])
    received: dict[int, str] = {}
    payload_digest = None
    for line in lines[1:]:
        index, _, value = line.partition(" ")
        if index.isdigit() and len(value) == 32:
            received[int(index)] = value
        elif index == "sha256" and len(value) == 64:
            payload_digest = value
        else:
            raise ValueError(f"record {line[:80]!r} is not a chunk's or the payload's")
    slot, size, count, chunk_size = (header[name] for name in _HEADER)
    return _Transfer(slot, size, count, chunk_size, received, payload_digest)
