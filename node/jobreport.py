"""A deployed job's report: the aggregator's record of it and, read from the federation's
events log, its history, turned into the results a simulation writes, so that
:mod:`node.report` draws both alike.

``<aggregator output>/<job id>/job.json`` (:func:`node.results.write_job`) holds the final
Dice per site and region, the rounds' times, late updates and refused ring hops. The
per-round history is in the events each party published while the job ran: every site's
score of each model it received and trained (with ε spent, under differential privacy), the
seconds from each model's arrival at a site to its sending on, messages refused, and the
job's start and end, and the bytes each party published for it (its ``sent`` events).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from node.report import Context, HopTime
from node.results import JOB_FILE
from node.simulate import (
    RESULTS_FILE,
    MetricsRow,
    PrivacySpent,
    RoundRow,
    SimulationResult,
    SiteData,
    TrafficSummary,
    weighted_overall,
)
from node.watch import ReadStream, authentic
from relay.envelope import (
    AGGREGATOR,
    EVENTS,
    Detail,
    Envelope,
    EventEnvelope,
    MetricsEnvelope,
)
from relay.errors import ConfigError, EnvelopeError, InvalidInput
from relay.jobspec import JobSpec
from relay.monitor import MetricsEvent
from relay.security import Security
from relay.topology import LOG_MAX_AGE
from relay.transport import Message
from relay.validation import parse_json
from relay.workflows.state import GateRefusal

IDLE_S = 1.0
"""Seconds without a message after which the events log counts as read to its end."""


class JobRecord(BaseModel):
    """What ``job.json`` holds."""

    status: str
    reason: str = ""
    job: JobSpec
    final: dict[str, dict[str, float]] = Field(default_factory=dict)
    final_counts: dict[str, int] = Field(default_factory=dict)
    """Validation cases behind each site's final scores."""
    rounds: list[RoundRow] = Field(default_factory=list)
    late: list[str] = Field(default_factory=list)
    refused_hops: list[GateRefusal] = Field(default_factory=list)
    members: list[str] = Field(default_factory=list)
    model_file: str | None = None
    model_sha256: str | None = None


def job_file(path: Path) -> Path | None:
    """The deployed job's ``job.json`` that ``path`` names (the file, or the job's folder);
    None when it names a simulation's results (or neither: :func:`node.report.load_results`
    says what is missing)."""
    if path.is_dir():
        has_results = (path / RESULTS_FILE).is_file()
        return path / JOB_FILE if (path / JOB_FILE).is_file() and not has_results else None
    return path if path.name == JOB_FILE else None


def load_job(file: Path) -> JobRecord:
    """A deployed job's record; ConfigError says what is wrong with it."""
    try:
        text = file.read_text()
    except OSError as e:
        raise ConfigError(
            f"{file}: cannot be read ({e.strerror}); give a deployed job's folder "
            "(<the aggregator's output>/<job id>) or its job.json"
        ) from e
    try:
        return parse_json(JobRecord, text, what=str(file))
    except EnvelopeError as e:
        raise ConfigError(
            f"{e}; is it a job.json the aggregator of this fedrelay version wrote?"
        ) from e


@dataclass
class JobEvents:
    """One job's events from the events log."""

    job_id: str
    metrics: list[MetricsEvent] = field(default_factory=list)
    hops: list[HopTime] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Messages of the job a party dead-lettered, and errors it hit, each with its reason."""
    moved: Counter[str] = field(default_factory=Counter)
    """Bytes the parties published for the job, by message kind (their ``sent`` events)."""
    started: float | None = None
    finished: float | None = None
    seen: int = 0
    """Events of this job taken in."""
    ignored: int = 0
    """Messages in the log (of any job) left out: unreadable, not from the party they name,
    or, where the federation signs, not signed by it."""

    @property
    def seconds(self) -> float | None:
        """From the job's start to its end, if the log holds both."""
        if self.started is None or self.finished is None:
            return None
        return round(self.finished - self.started, 3)

    def add(self, envelope: Envelope) -> None:
        """Take an authentic envelope from the log in, if it is about this job."""
        if envelope.job_id != self.job_id:
            return
        if isinstance(envelope, EventEnvelope) and envelope.event == "job_started":
            if envelope.sender != AGGREGATOR:
                return
            # The aggregator starts a job once: whatever came before is not this run's.
            self.metrics, self.hops, self.refused = [], [], []
            self.moved = Counter()
            self.started, self.finished, self.seen = envelope.created_at, None, 0
        self.seen += 1
        if isinstance(envelope, MetricsEnvelope) and envelope.recipient == EVENTS:
            self.metrics.append(MetricsEvent.of(envelope))
        elif isinstance(envelope, EventEnvelope):
            self._event(envelope)

    def _event(self, event: EventEnvelope) -> None:
        detail = event.detail
        if event.event == "sent":
            for key, value in detail.items():
                if key.startswith("bytes:") and isinstance(value, int):
                    self.moved[key.removeprefix("bytes:")] += value
            # The round and hop are the event's detail (an event envelope's own are 0).
            seconds, round, hop = (_number(detail.get(key)) for key in ("seconds", "round", "hop"))
            if seconds is not None and round is not None and hop is not None:
                to = str(detail.get("to") or "")
                self.hops.append(HopTime(event.sender, int(round), int(hop), to, seconds))
        elif event.event in ("rejected", "error"):
            self.refused.append(f"{event.sender}: {detail.get('reason')}")
        elif event.event == "job_finished" and event.sender == AGGREGATOR:
            self.finished = event.created_at


def _number(value: Detail) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_job_events(
    read: ReadStream, job_id: str, *, security: Security | None, idle_s: float = IDLE_S
) -> JobEvents:
    """Job ``job_id``'s events, read from the log's start until no message came for
    ``idle_s``; with ``security`` (the roster), only those whose signature verifies, as
    ``fedrelay watch`` takes them. TransportError if the log cannot be read."""
    events = JobEvents(job_id)

    def add(message: Message, _offset: int) -> bool:
        try:
            events.add(authentic(message, security))
        except InvalidInput:
            events.ignored += 1
        return False

    read(add, "first", idle_s)
    return events


def job_result(
    record: JobRecord, events: JobEvents | None, *, source: str, unread: str = ""
) -> tuple[SimulationResult, Context]:
    """The results and report context of a deployed job: from its ``record`` alone, or with
    its ``events``. ``unread`` says why the events log was asked for and not read."""
    job = record.job
    every = events.metrics if events is not None else []
    metrics = [m for m in every if m.site in job.sites]  # sites of another job's ring: none
    # Validation cases: what each site's scores say they cover, the final ones' first.
    cases = {m.site: m.sample_count for m in metrics if m.sample_count} | record.final_counts
    # FedAvg and the ensemble weigh each site by its training cases; a ring's are not known.
    data = {
        site: SiteData(
            train_cases=max((r.contributors.get(site, 0) for r in record.rounds), default=0),
            validation_cases=cases.get(site, 0),
        )
        for site in job.sites
    }
    counts = {site: d.validation_cases for site, d in data.items()}
    # The model every site scores as it arrives in round 0 is the initial one (FedAvg and the
    # ensemble); a ring's hop 0 reaches its first site only.
    initial = {
        m.site: dict(m.metrics)
        for m in metrics
        if m.stage == "received" and m.round == 0 and m.hop == 0
    }
    everywhere = set(initial) == set(job.sites)
    final = {site: record.final[site] for site in job.sites if site in record.final}
    privacy = {}
    if job.privacy is not None:
        # What each site reported last: the ε spent by the last model it sent.
        spent = {m.site: m.metrics["epsilon"] for m in metrics if "epsilon" in m.metrics}
        privacy = {
            site: PrivacySpent(epsilon=spent[site], delta=job.privacy.delta)
            for site in job.sites
            if site in spent
        }
    seconds = events.seconds if events is not None else None
    moved = events.moved if events is not None else Counter()
    hops = [h for h in events.hops if h.site in job.sites] if events is not None else []
    result = SimulationResult(
        status=record.status,
        reason=record.reason,
        job=job,
        data=data,
        initial=initial,
        final=final,
        initial_overall=weighted_overall(initial, counts) if everywhere else {},
        final_overall=weighted_overall(final, counts),
        history=[
            MetricsRow(site=m.site, stage=m.stage, round=m.round, hop=m.hop, metrics=m.metrics)
            for m in metrics
        ],
        rounds=record.rounds,
        late=record.late,
        refused_hops=record.refused_hops,
        dead_letters=events.refused if events is not None else [],
        bytes_moved=TrafficSummary(
            total_bytes=sum(moved.values()), bytes_by_kind=dict(moved), messages_by_kind={}
        ),
        wall_time_s=seconds or 0.0,
        model_file=record.model_file,
        model_sha256=record.model_sha256,
        members=record.members,
        privacy=privacy,
    )
    return result, Context(
        source=source,
        notes=tuple(_notes(record, events, unread)),
        hops=tuple(sorted(hops, key=lambda h: (h.round, h.hop, job.sites.index(h.site)))),
        traffic_counted=bool(moved),
        wall_time_known=seconds is not None,
    )


def _notes(record: JobRecord, events: JobEvents | None, unread: str) -> list[str]:
    job_id = record.job.job_id
    curves = "the per-round Dice curves, the time per hop" + (
        " and the privacy spent (ε)" if record.job.privacy is not None else ""
    )
    if unread:
        return [
            f"{unread}. This report holds what job.json holds; {curves} are in the events log. "
            "Check the broker is up and the party (`--as`) may read the log, then run the "
            "report again."
        ]
    if events is None:
        return [
            f"job.json alone: {curves} are in the federation's events log; run `fedrelay "
            f"report <job folder> -c <federation file>` to add them."
        ]
    notes = []
    if not events.seen:
        notes.append(
            f"the events log holds no event of job {job_id}: it keeps events for "
            f"{LOG_MAX_AGE} (x-max-age), and -c must name federation "
            f"{record.job.federation!r}'s file; {curves} are missing."
        )
    if events.ignored:
        notes.append(
            f"{events.ignored} message(s) in the events log were left out: unreadable, not "
            "from the party they name, or (where the federation signs) not signed by it."
        )
    return notes
