"""The journal: what an endpoint has acked but not yet finished, and what it has finished.

"Persist, then ack, then act": a received message (envelope and payload) is written here and
fsynced before its delivery is acked; it is deleted only once the work it asked for is done
and that work's own messages are confirmed by the broker. A restarted endpoint finds the
unfinished messages here and does their work again; the ledger of finished messages lets it
drop redelivered or duplicated copies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relay.envelope import Envelope, parse_envelope, to_wire
from relay.errors import ConfigError, EnvelopeError
from relay.messaging import Received
from relay.storage import append_line, map_file, replace_file, write_file

MAX_ATTEMPTS = 3
"""Times an endpoint starts the work of one journalled message before giving up on it: work
that crashes the process every time would otherwise crash it on every restart."""


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
        self.ledger = spool / "done.log"
        self.done: set[str] = set()
        if self.ledger.exists():
            self.done = {line for line in self.ledger.read_text().splitlines() if line}
        names = sorted(p.stem for p in self.directory.glob("*.json") if p.stem.isdigit())
        self._next = int(names[-1]) + 1 if names else 0

    def keys(self) -> set[str]:
        """Dedup keys of every finished or unfinished message."""
        return self.done | {entry.key for entry, _ in self._entries()}

    def persist(self, received: Received, key: str) -> Entry:
        """Make ``received`` durable (payload, then envelope, then the directory)."""
        name = f"{self._next:012d}"
        self._next += 1
        payload = self.directory / f"{name}.payload"
        if received.path is not None:
            received.path.replace(payload)  # the reassembled chunks, already fsynced
        else:
            write_file(payload, memoryview(received.payload).cast("B"))
        entry = Entry(name, key, attempts=1)  # persisted right before its work first starts
        self._record(entry, received.envelope)
        return entry

    def _record(self, entry: Entry, envelope: Envelope) -> None:
        record = {"key": entry.key, "attempts": entry.attempts, "envelope": to_wire(envelope)}
        replace_file(self.directory / f"{entry.name}.json", json.dumps(record).encode())

    def attempt(self, entry: Entry, envelope: Envelope) -> Entry:
        """Count one more start of this message's work, durably, before starting it."""
        counted = Entry(entry.name, entry.key, entry.attempts + 1)
        self._record(counted, envelope)
        return counted

    def complete(self, entry: Entry) -> None:
        """The message's work is done: record it in the ledger, then forget the message."""
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
