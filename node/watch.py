"""Following jobs from their events: what ``fedrelay watch`` and ``fedrelay status`` show.

Every party publishes events (``events.<kind>``): the aggregator a job's start, each round's
opening and closing, its evaluation and end; sites the Dice of each model they receive and
train and each model they send on; anyone a message it refused or an error. They reach the
federation's events log, a stream any number of watchers read from its start without
consuming it. :class:`Jobs` folds them into one view per job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from relay.envelope import (
    AGGREGATOR,
    ControlEnvelope,
    Envelope,
    EventEnvelope,
    MetricsEnvelope,
    to_wire,
)
from relay.errors import InvalidInput
from relay.frame import decode_frame
from relay.jobspec import Algorithm
from relay.security import Security
from relay.transport import Message

MAX_NOTES = 20
"""Rejections and errors kept per job (the newest); the count says how many there were."""


@dataclass
class SiteView:
    """One site's part in a job, as its events tell it."""

    trained: int = 0
    round: int | None = None
    hop: int | None = None
    stage: str = ""
    """What the site last did: received, trained, sent."""
    dice_mean: float | None = None
    last_seen: float | None = None


@dataclass
class JobView:
    """One job, as its events tell it."""

    job_id: str
    algorithm: str = ""
    sites: list[str] = field(default_factory=list)
    rounds: int = 0
    status: str = "running"
    reason: str = ""
    round: int = 0
    hop: int = 0
    rounds_closed: int = 0
    dice_mean: float | None = None
    """The final model's mean Dice over every site's validation cases, once done."""
    started: float | None = None
    updated: float | None = None
    per_site: dict[str, SiteView] = field(default_factory=dict)
    rejected: int = 0
    errors: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Training passes each site makes in the whole job."""
        return 1 if self.algorithm == Algorithm.SWT else self.rounds

    @property
    def finished(self) -> bool:
        """Done, failed or cancelled."""
        return self.status not in ("running", "evaluating")

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return asdict(self) | {"steps": self.steps}

    def site(self, name: str) -> SiteView:
        """The view of ``name``, made on first mention."""
        if name not in self.per_site:
            self.per_site[name] = SiteView()
        return self.per_site[name]

    def note(self, text: str) -> None:
        """Keep a rejection or error, the newest :data:`MAX_NOTES`."""
        self.notes = [*self.notes, text][-MAX_NOTES:]


def authentic(message: Message, security: Security | None) -> Envelope:
    """The envelope of an events-log message whose ``sender`` is the broker user that
    published it and, given the roster (``security``), whose signature verifies;
    InvalidInput otherwise."""
    envelope, _ = decode_frame(message.body)
    if envelope.sender != message.user_id:
        raise InvalidInput(f"sender {envelope.sender!r} is not {message.user_id!r}")
    if security is not None:
        security.verify(to_wire(envelope), envelope.sender)
    return envelope


class Jobs:
    """Every job seen in the events, in the order they started.

    ``security`` (the federation's roster) drops events whose signature does not verify. An
    event whose ``sender`` is not the broker ``user_id`` is dropped in any case, and job life
    cycle events count only from the aggregator.
    """

    def __init__(self, *, security: Security | None = None) -> None:
        self.security = security
        self.views: dict[str, JobView] = {}
        self.ignored = 0
        self.newest = 0.0
        """When the newest event folded in was made (its sender's clock)."""

    def add(self, message: Message) -> tuple[str, JobView] | None:
        """Fold one event message in; returns what happened (the event's name) and its job's
        view, or None if it was not used."""
        try:
            envelope = authentic(message, self.security)
        except InvalidInput:
            self.ignored += 1
            return None
        self.newest = max(self.newest, envelope.created_at)
        view = self._fold(envelope)
        return None if view is None else (_name(envelope), view)

    def _fold(self, envelope: Envelope) -> JobView | None:
        job_id = envelope.job_id
        from_aggregator = envelope.sender == AGGREGATOR
        if isinstance(envelope, EventEnvelope) and envelope.event == "job_started":
            if not from_aggregator:
                return None
            detail = envelope.detail
            started = JobView(
                job_id,
                algorithm=str(envelope.algorithm or ""),
                sites=str(detail.get("sites") or "").split(","),
                rounds=_int(detail.get("rounds")),
                started=envelope.created_at,
            )
            self.views.pop(job_id, None)
            self.views[job_id] = started  # last in order: the newest job
            for name in started.sites:
                started.site(name)
        view = self.views.get(job_id)
        if view is None:
            return None
        view.updated = envelope.created_at
        if isinstance(envelope, MetricsEnvelope):
            part = view.site(envelope.sender)
            part.stage, part.last_seen = envelope.stage, envelope.created_at
            part.round, part.hop = envelope.round, envelope.hop
            if envelope.stage == "trained":
                part.trained += 1
            part.dice_mean = envelope.metrics.get("dice_mean", part.dice_mean)
            view.round, view.hop = max(view.round, envelope.round), envelope.hop
        elif isinstance(envelope, ControlEnvelope) and from_aggregator:
            if not view.finished:  # job_finished, just before, said which end it was
                view.status = "done" if envelope.command == "job_done" else "failed"
            view.reason = envelope.reason or view.reason
        elif isinstance(envelope, EventEnvelope):
            self._event(view, envelope, from_aggregator=from_aggregator)
        return view

    @staticmethod
    def _event(view: JobView, event: EventEnvelope, *, from_aggregator: bool) -> None:
        detail = event.detail
        name = event.event
        if name == "sent":
            if from_aggregator:
                return  # its broadcasts: counted in reports, no site's progress
            part = view.site(event.sender)
            part.stage, part.last_seen = "sent", event.created_at
        elif name == "rejected":
            view.rejected += 1
            view.note(f"{event.sender} refused a message: {detail.get('reason')}")
        elif name == "error":
            view.errors += 1
            view.note(f"{event.sender}: {detail.get('reason')}")
        elif name == "hop_skipped":
            view.note(
                f"{event.sender}: {detail.get('site')} did not take the token (cycle "
                f"{detail.get('round')} hop {detail.get('hop')}); sent on to {detail.get('to')}"
            )
        elif not from_aggregator:
            return
        elif name == "round_opened":
            view.round = _int(detail.get("round"))
        elif name == "round_closed":
            view.rounds_closed += 1
        elif name == "evaluating":
            view.status = "evaluating"
        elif name == "job_finished":
            view.status = str(detail.get("status") or view.status)
            view.reason = str(detail.get("reason") or "")
            dice = detail.get("dice_mean")
            view.dice_mean = float(dice) if isinstance(dice, int | float) else None
        elif name == "job_cancelled":
            view.status = "cancelled"
            view.note(f"cancelled: {detail.get('reason', '')}")
        elif name == "job_resumed":
            if view.finished:  # resumed by the operator (else: the aggregator restarted)
                view.status, view.reason = "running", ""
            view.note(f"resumed: {detail.get('reason', '')}")

    def latest(self) -> JobView | None:
        """The job that started last."""
        return next(reversed(self.views.values()), None)


def _name(envelope: Envelope) -> str:
    if isinstance(envelope, EventEnvelope):
        return envelope.event
    if isinstance(envelope, MetricsEnvelope):
        return f"metrics_{envelope.stage}"
    if isinstance(envelope, ControlEnvelope):
        return str(envelope.command)
    return str(envelope.kind)


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


ReadStream = Callable[[Callable[[Message, int], bool], str | int, float | None], str | int]
"""Reads the events log from an offset, calling back per message, until the callback says
stop or (given seconds) no message came for that long; returns where the log goes on."""

Changed = Callable[[str, JobView], None]
"""Told what happened (an event's name) and the job's view after it."""


CAUGHT_UP_S = 2.0
"""An event made this long after a snapshot began is live: the snapshot has caught up (the
allowance is for clocks that differ between machines)."""


def snapshot(read: ReadStream, jobs: Jobs, *, idle_s: float = 1.0) -> str | int:
    """Fold every event in the log so far into ``jobs``; returns where the log goes on. It
    stops once the log is idle for ``idle_s`` or an event made after it began arrives, so a
    busy federation's log does not keep it reading."""
    began = time.time()

    def add(message: Message, _offset: int) -> bool:
        jobs.add(message)
        return jobs.newest > began + CAUGHT_UP_S

    return read(add, "first", idle_s)


def follow(
    read: ReadStream,
    jobs: Jobs,
    job_id: str | None,
    on_change: Changed,
    *,
    idle_timeout_s: float | None = None,
) -> JobView | None:
    """Catch up on the log, then follow job ``job_id`` (or the newest job if it still runs,
    else the next to start) until it ends; ``on_change`` hears of each of its events.

    Returns its view; None when there is no such job and none starts. Gives up, returning the
    view as it stands, after ``idle_timeout_s`` seconds without any event.
    """
    position = snapshot(read, jobs)
    latest = jobs.latest()
    if job_id is not None:
        chosen: str | None = job_id
    else:  # the job running now; if none is, the next to start
        chosen = latest.job_id if latest is not None and not latest.finished else None
    view = jobs.views.get(chosen or "")
    if view is not None:
        on_change("caught_up", view)
        if view.finished:
            return view

    def add(message: Message, _offset: int) -> bool:
        nonlocal chosen
        added = jobs.add(message)
        if added is None:
            return False
        what, seen = added
        if chosen is None and what == "job_started":
            chosen = seen.job_id
        if seen.job_id != chosen:
            return False
        on_change(what, seen)
        return seen.finished

    read(add, position, idle_timeout_s)
    return jobs.views.get(chosen or "")
