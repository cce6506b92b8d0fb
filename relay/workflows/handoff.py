"""A ring site's hand-off of the token, under ``absent_site`` skip or revisit.

The site that sends the token keeps it until the site it went to says it has stored it
(``hop_taken``). If that word has not come by the deadline, the token's message has expired
unconsumed in the absent site's queue (it was published with ``hop_timeout_s`` to live), and
the sender sends its kept copy on to the stop after (:func:`relay.workflows.ring.skip`). The
kept copy is durable: a sender that restarts still skips on time.

One pair of files per job under the spool's ``handoffs/``: ``<job>.model`` (the token as the
codec encodes it) and ``<job>.json`` (where it went, the deadline, the sites skipped so far).
A ring has one token, so a site holds at most one hand-off per job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relay.codec import StateDict, decode, encode
from relay.storage import replace_file
from relay.workflows.ring import Stop

GRACE = 0.5
"""The sender waits ``hop_timeout_s × (1 + GRACE)`` for ``hop_taken``: the token expires in the
absent site's queue after ``hop_timeout_s``, and a site that took it just in time still needs
to store it and answer."""


@dataclass(frozen=True)
class Handoff:
    """A token sent and not yet taken: where it went, and when to give up on that site."""

    job_id: str
    stop: Stop
    deadline: float
    """Seconds since the epoch."""
    skipped: tuple[str, ...] = ()
    """Sites this hand-off has skipped so far, in order."""
    sent: bool = True
    """Whether the broker confirmed the whole token; False while it is being published (a
    restarted site sends it again, instead of skipping a site that never got it)."""


class Handoffs:
    """The hand-offs a site holds: on disk, and in memory for the deadline checks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._held = {h.job_id: h for h in map(self._load, folder.glob("*.json"))}
        for path in [*folder.glob("*.model"), *folder.glob("*.tmp")]:
            if path.suffix == ".tmp" or path.stem not in self._held:
                path.unlink()  # a release or a hold cut short by a crash

    def hold(self, handoff: Handoff, weights: StateDict | None = None) -> None:
        """Keep ``handoff`` (and, when given, the token's ``weights``) durably, replacing the
        job's earlier one."""
        if weights is not None:
            replace_file(self._model(handoff.job_id), bytes(encode(weights)))
        record = {
            "recipient": handoff.stop.recipient,
            "round": handoff.stop.round,
            "hop": handoff.stop.hop,
            "revisit": list(handoff.stop.revisit),
            "deadline": handoff.deadline,
            "skipped": list(handoff.skipped),
            "sent": handoff.sent,
        }
        replace_file(self._record(handoff.job_id), json.dumps(record).encode())
        self._held[handoff.job_id] = handoff

    def get(self, job_id: str) -> Handoff | None:
        """The job's hand-off, if one is held."""
        return self._held.get(job_id)

    def pending(self) -> list[Handoff]:
        """Every hand-off held, soonest deadline first."""
        return sorted(self._held.values(), key=lambda h: h.deadline)

    def weights(self, job_id: str) -> StateDict:
        """The token kept for the job's hand-off."""
        return decode(bytearray(self._model(job_id).read_bytes()))

    def release(self, job_id: str) -> None:
        """Forget the job's hand-off: taken, sent where it needs no word back, or the job is
        over. The record goes first: a record without its model is never left."""
        self._held.pop(job_id, None)
        self._record(job_id).unlink(missing_ok=True)
        self._model(job_id).unlink(missing_ok=True)

    def _load(self, path: Path) -> Handoff:
        record = json.loads(path.read_text())
        stop = Stop(record["recipient"], record["round"], record["hop"], tuple(record["revisit"]))
        return Handoff(
            path.stem,
            stop,
            record["deadline"],
            tuple(record["skipped"]),
            record.get("sent", True),
        )

    def _record(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def _model(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.model"
