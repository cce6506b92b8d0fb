"""The journal: what an endpoint has acked but not yet finished, and what it has finished.

"Persist, then ack, then act": a received message (envelope and payload) is written here and
fsynced before its delivery is acked; it is deleted only once the work it asked for is done
and that work's own messages are confirmed by the broker. A restarted endpoint finds the
unfinished messages here and does their work again; the ledger of finished messages lets it
drop redelivered or duplicated copies.

A spool whose disk is (nearly) full stops the endpoint with :class:`SpoolFull` before it takes
a message it could not persist; nothing is acked that is not on disk, and nothing on disk is
given up because the disk filled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from relay.envelope import Envelope, parse_envelope, to_wire
from relay.errors import ConfigError, EnvelopeError, FedrelayError
from relay.jobspec import MAX_CHUNK_SIZE
from relay.messaging import Received
from relay.storage import (
    NO_SPACE,
    append_line,
    fsync_directory,
    map_file,
    replace_file,
    write_file,
)

MAX_ATTEMPTS = 3
"""Times an endpoint starts the work of one journalled message before giving up on it: work
that crashes the process every time would otherwise crash it on every restart."""

SPOOL_HEADROOM = MAX_CHUNK_SIZE + 1024 * 1024
"""Free bytes the spool's disk must have before an endpoint takes a message: the largest
message any job sends (one chunk of the largest chunk size) and the records written with it.
Checked before taking, because a message taken and then not persisted goes back to its queue
counted as a delivery, and the queue's delivery limit dead-letters it after a few."""


class SpoolFull(FedrelayError):
    """The spool's disk has no room for what must be persisted: the endpoint stops (nothing
    unsaved was acked) and resumes from its spool once it is restarted with space."""


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _free(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def spool_full(spool: Path, cause: str) -> SpoolFull:
    """The error that stops an endpoint whose spool cannot grow, saying where and what to do."""
    return SpoolFull(
        f"spool {spool}: {cause}; the disk mounted at {_mount_point(spool)} has "
        f"{_free(spool) / 2**20:.1f} MiB free. The node stops: nothing it has not saved was "
        "acked, and what it saved stays in the spool. Make room (free space on that disk, or "
        "raise the quota or file-size limit that stopped the write), then restart it: it "
        "resumes where it stopped"
    )


@dataclass(frozen=True)
class Entry:
    """One unfinished message in the journal."""

    name: str
    key: str
    attempts: int = 0


class Journal:
    """The durable record of one endpoint's unfinished and finished messages."""

    def __init__(self, spool: Path) -> None:
        self.directory = spool / "journal"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.spool = spool
        self.ledger = spool / "done.log"
        self.done: set[str] = set()
        if self.ledger.exists():
            self.done = {line for line in _whole_lines(self.ledger).splitlines() if line}
        names = sorted(p.stem for p in self.directory.glob("*.json") if p.stem.isdigit())
        self._next = int(names[-1]) + 1 if names else 0

    def check_space(self) -> None:
        """SpoolFull unless the spool's disk has :data:`SPOOL_HEADROOM` free bytes."""
        free = _free(self.directory)
        if free < SPOOL_HEADROOM:
            raise spool_full(
                self.spool,
                f"less than the {SPOOL_HEADROOM / 2**20:.0f} MiB free that a node needs to "
                "take the next message; nothing was taken from its queue",
            )

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Turn a write that failed for want of space into SpoolFull."""
        try:
            yield
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            where = f" ({e.filename})" if e.filename else ""
            raise spool_full(self.spool, f"a write failed{where}: {e.strerror}") from e

    def keys(self) -> set[str]:
        """Dedup keys of every finished or unfinished message."""
        return self.done | {entry.key for entry, _ in self._entries()}

    def persist(self, received: Received, key: str) -> Entry:
        """Make ``received`` durable (payload, then envelope, then the directory)."""
        name = f"{self._next:012d}"
        self._next += 1
        payload = self.directory / f"{name}.payload"
        with self.writing():
            try:
                if received.path is not None:
                    received.path.replace(payload)  # the reassembled chunks, already fsynced
                else:
                    write_file(payload, memoryview(received.payload).cast("B"))
                entry = Entry(name, key, attempts=1)  # persisted right before its work starts
                self._record(entry, received.envelope)
            except OSError:
                # Not persisted, so not acked: the message comes again. Reassembled chunks go
                # back where the redelivered last chunk finds them complete; a partial copy
                # goes away (the space it holds may be what the disk lacks).
                # The record first (it may have been renamed into place before the directory's
                # fsync failed): a record whose payload was moved back would stop every restart.
                (self.directory / f"{name}.json").unlink(missing_ok=True)
                (self.directory / f"{name}.json.tmp").unlink(missing_ok=True)
                if received.path is not None and payload.exists():
                    payload.replace(received.path)
                    fsync_directory(received.path.parent)
                elif received.path is None:
                    payload.unlink(missing_ok=True)
                raise
        return entry

    def _record(self, entry: Entry, envelope: Envelope) -> None:
        record = {"key": entry.key, "attempts": entry.attempts, "envelope": to_wire(envelope)}
        replace_file(self.directory / f"{entry.name}.json", json.dumps(record).encode())

    def attempt(self, entry: Entry, envelope: Envelope) -> Entry:
        """Count one more start of this message's work, durably, before starting it."""
        counted = Entry(entry.name, entry.key, entry.attempts + 1)
        with self.writing():
            self._record(counted, envelope)
        return counted

    def uncount(self, entry: Entry, envelope: Envelope) -> None:
        """Take back the start counted for ``entry``: its work stopped because the spool's disk
        was full, which is no fault of the message, so it must not bring it nearer to being
        given up. Best effort: with no room even for that record, the count stays."""
        if entry.attempts > 1:
            try:
                self._record(Entry(entry.name, entry.key, entry.attempts - 1), envelope)
            except OSError as e:
                if e.errno not in NO_SPACE:
                    raise

    def complete(self, entry: Entry) -> None:
        """The message's work is done: record it in the ledger, then forget the message."""
        with self.writing():
            append_line(self.ledger, entry.key)
        self.done.add(entry.key)
        (self.directory / f"{entry.name}.json").unlink(missing_ok=True)
        (self.directory / f"{entry.name}.payload").unlink(missing_ok=True)

    def _entries(self) -> list[tuple[Entry, Envelope]]:
        entries = []
        for path in sorted(p for p in self.directory.glob("*.json") if p.stem.isdigit()):
            record = json.loads(path.read_text())
            entry = Entry(path.stem, record["key"], record.get("attempts", 0))
            try:
                envelope = parse_envelope(record["envelope"])
            except EnvelopeError as e:
                raise ConfigError(
                    f"journal entry {path}: {e}. It was written by another fedrelay version: "
                    "let that version finish its work, or move the spool aside to start afresh"
                ) from e
            entries.append((entry, envelope))
        return entries

    def pending(self) -> list[tuple[Entry, Received]]:
        """Unfinished messages, oldest first, with their payloads mapped from disk."""
        out = []
        for entry, envelope in self._entries():
            payload = map_file(self.directory / f"{entry.name}.payload")
            out.append((entry, Received(envelope, payload)))
        return out


def _whole_lines(ledger: Path) -> str:
    """The ledger's complete lines. A line torn by a crash or a full disk (its work was not
    recorded as done, so it is done again) is cut off, so the next key starts a line of its
    own instead of merging with it into a key that matches nothing."""
    data = ledger.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with ledger.open("r+b") as f:
            f.truncate(len(data))
            f.flush()
            os.fsync(f.fileno())
    return data.decode()
