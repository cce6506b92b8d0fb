"""The aggregator side of every workflow: starts jobs, fans updates in, finishes jobs.

- FedAvg: broadcast the global model, fold site updates into a running sample-weighted mean
  as they arrive, close the round when every site has reported (or, past the round's
  deadline, when at least the quorum has), repeat. Late updates are recorded, never mixed
  into a later round.
- Ensemble: every site trains its own model; the members fan in and the ensemble predicts by
  averaging their probabilities.
- SWT / CWT: the coordinator only sends the token to the first site and receives the final
  model from the last; sites route the ring themselves (:mod:`relay.workflows.ring`).

Every workflow ends the same way: the final model (or ensemble) goes to every site to be
evaluated on its validation data, and the job is done when the sites' metrics are in.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from relay.aggregation import (
    WeightedMean,
    bundle,
    check_compatible,
    clip_update,
    coordinate_median,
    server_step,
    trimmed_mean,
    update_norm,
)
from relay.codec import StateDict, decode, encode
from relay.endpoint import Action, Endpoint
from relay.envelope import (
    AGGREGATOR,
    EVENTS,
    Command,
    ControlEnvelope,
    EnsembleMemberEnvelope,
    Envelope,
    JobSpecEnvelope,
    MetricsEnvelope,
    ModelEnvelope,
    Task,
    UpdateEnvelope,
)
from relay.errors import ConfigError, EnvelopeError, JobFailed, TransportError
from relay.jobspec import Aggregation, Algorithm, JobSpec
from relay.messaging import Received, check_chunking
from relay.security import Security
from relay.topology import Topology
from relay.transport import Transport
from relay.validation import parse_json
from relay.workflows.ring import arrival_before, expected_hop, previous_stop

log = logging.getLogger(__name__)


class Status(StrEnum):
    """Where a job is in its life."""

    RUNNING = "running"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"


@dataclass
class RoundRecord:
    """One closed FedAvg round (or the ensemble's fan-in)."""

    round: int
    contributors: dict[str, int]
    missing: list[str]
    closed_by: str
    seconds: float
    clipped: dict[str, float] = field(default_factory=dict)
    """Sites whose update was clipped to the job's ``max_update_norm``, with its norm before."""


class GateRefusal(BaseModel):
    """A ring hop refused by the receiving site's validation gate: ``site`` scored the model
    ``sender`` trained lower, by more than the job's ``ring_gate``, than the model ``sender``
    had been sent, and trained that one instead."""

    model_config = ConfigDict(frozen=True)

    site: str
    cycle: int
    hop: int
    sender: str
    dice_mean: float
    reference_dice_mean: float


@dataclass
class JobState:
    """Everything the coordinator knows about one job."""

    spec: JobSpec
    reference: StateDict
    status: Status = Status.RUNNING
    reason: str = ""
    round: int = 0
    started: float = field(default_factory=time.time)
    round_started: float = field(default_factory=time.time)
    deadline: float | None = None
    mean: WeightedMean = field(default_factory=WeightedMean)
    velocity: StateDict = field(default_factory=dict)
    """FedAvgM's running change of the global model (float64), empty for plain FedAvg."""
    contributors: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    """This round's sites whose update was clipped, with its norm before."""
    members: dict[str, StateDict] = field(default_factory=dict)
    """Ensemble members, or (median, trimmed mean) this round's site models."""
    final: list[StateDict] = field(default_factory=list)
    final_sites: list[str] = field(default_factory=list)
    final_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    final_counts: dict[str, int] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    refused: list[GateRefusal] = field(default_factory=list)
    """Ring hops a site's validation gate refused."""

    @property
    def finished(self) -> bool:
        """Done or failed."""
        return self.status in (Status.DONE, Status.FAILED)


class Coordinator(Endpoint):
    """The aggregator process's logic, for all four workflows."""

    def __init__(
        self,
        *,
        transport: Transport,
        topology: Topology,
        spool: Path,
        clock: Callable[[], float] = time.time,
        on_finish: Callable[[JobState], None] | None = None,
        security: Security | None = None,
    ) -> None:
        super().__init__(
            name=AGGREGATOR,
            transport=transport,
            topology=topology,
            spool=spool,
            security=security,
        )
        self.clock = clock
        self.on_finish = on_finish
        self.jobs: dict[str, JobState] = {}
        self._submitted: dict[str, JobSpec] = {}

    # -- starting --------------------------------------------------------------------------

    def submit(self, spec: JobSpec, initial: StateDict) -> JobState:
        """Send the job spec to every site and start the workflow with ``initial`` weights."""
        if spec.federation != self.topology.federation:
            raise ConfigError(
                f"job.federation is {spec.federation!r} but this aggregator serves "
                f"{self.topology.federation!r}"
            )
        unknown = sorted(set(spec.sites) - set(self.topology.sites))
        if unknown:
            raise ConfigError(
                f"job.sites: {unknown} are not in federation {spec.federation!r} "
                f"(sites: {list(self.topology.sites)})"
            )
        if spec.job_id in self.jobs:
            raise ConfigError(f"job {spec.job_id} was already submitted")
        now = self.clock()
        job = JobState(spec, {k: v.detach().clone() for k, v in initial.items()}, started=now)
        self.jobs[spec.job_id] = job
        try:
            self._start(job)
        except TransportError as e:
            job.status, job.reason = Status.FAILED, f"could not start the job: {e}"
            raise JobFailed(job.reason) from e
        return job

    def _start(self, job: JobState) -> None:
        spec, now = job.spec, job.started
        spec_json = spec.model_dump_json().encode()
        for site in spec.sites:
            self._send(job, JobSpecEnvelope, spec_json, recipient=site)
        payload = encode(job.reference)
        if spec.algorithm.is_ring:
            # Peers route the token; all the coordinator can watch is that it comes back.
            job.deadline = now + spec.round_timeout_s * spec.rounds * len(spec.sites)
            self._send(job, ModelEnvelope, payload, recipient=spec.sites[0], round=0, hop=0)
        else:
            self._open_round(job, 0, payload)

    def _send(
        self,
        job: JobState,
        make: Callable[..., Envelope],
        payload: bytes | bytearray,
        **fields: object,
    ) -> None:
        self.outbox.send(
            make,
            payload,
            chunk_size=job.spec.chunk_size,
            job_id=job.spec.job_id,
            algorithm=job.spec.algorithm,
            **fields,
        )

    def _open_round(self, job: JobState, round: int, payload: bytes | bytearray) -> None:
        now = self.clock()
        job.round = round
        job.round_started = now
        job.mean = WeightedMean()
        job.contributors, job.clipped, job.members = {}, {}, {}
        budget = job.spec.rounds if job.spec.algorithm is Algorithm.ENSEMBLE else 1
        job.deadline = now + job.spec.round_timeout_s * budget
        for site in job.spec.sites:
            self._send(job, ModelEnvelope, payload, recipient=site, round=round)

    # -- receiving -------------------------------------------------------------------------

    def screen(self, envelope: Envelope) -> None:
        """Refuse envelopes for unknown jobs, from outsiders, or cut into foreign chunk sizes."""
        if envelope.sender == AGGREGATOR:
            self._screen_submission(envelope)
            return
        job = self._job(envelope)
        check_chunking(envelope, job.spec.chunk_size)

    # -- jobs submitted through the broker (``fedrelay job submit``) ------------------------

    def _screen_submission(self, envelope: Envelope) -> None:
        if envelope.job_id in self.jobs:
            raise EnvelopeError(f"job {envelope.job_id} was already submitted")
        if isinstance(envelope, JobSpecEnvelope):
            return
        if isinstance(envelope, ModelEnvelope) and envelope.job_id in self._submitted:
            if envelope.chunk_size not in (0, self._submitted[envelope.job_id].chunk_size):
                raise EnvelopeError("envelope.chunk_size: differs from the job's chunk_size")
            return
        raise EnvelopeError(
            f"envelope: a submission is a job spec, then its initial model; got {envelope.kind} "
            f"for job {envelope.job_id}"
        )

    def _prepare_submission(self, received: Received) -> Action:
        envelope = received.envelope
        if isinstance(envelope, JobSpecEnvelope):
            submitted = parse_json(JobSpec, bytes(received.payload), what="job")
            if submitted.job_id != envelope.job_id:
                raise EnvelopeError(f"job.job_id {submitted.job_id!r} differs from the envelope's")
            return lambda: self._submitted.__setitem__(submitted.job_id, submitted)
        spec = self._submitted.get(envelope.job_id)
        if spec is None:
            raise EnvelopeError(
                f"job {envelope.job_id}: its initial model came without its job spec (an "
                "aggregator restart in between loses the spec: submit the job again)"
            )
        initial = decode(received.payload)
        bad = [n for n, t in initial.items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise EnvelopeError(f"initial model: tensors {bad[:5]} hold NaN or infinite values")
        return lambda: self._start_submitted(spec, initial)

    def _start_submitted(self, spec: JobSpec, initial: StateDict) -> None:
        del self._submitted[spec.job_id]
        try:
            self.submit(spec, initial)
        except ConfigError as e:
            log.error("job %s refused: %s", spec.job_id, e)
            self.rejected.append(str(e))

    def _job(self, envelope: Envelope) -> JobState:
        job = self.jobs.get(envelope.job_id)
        if job is None:
            raise EnvelopeError(
                f"envelope.job_id: {envelope.job_id!r} is not a job this aggregator runs"
            )
        if envelope.sender not in job.spec.sites:
            raise EnvelopeError(
                f"envelope.sender: {envelope.sender!r} is not a site of job {envelope.job_id}"
            )
        return job

    def _weights(self, job: JobState, received: Received) -> StateDict:
        state = decode(received.payload)
        check_compatible(job.reference, state, who=f"model from {received.envelope.sender!r}")
        return state

    def prepare(self, received: Received) -> Action | None:
        """Check an update, member, final token or final metrics; return what to do with it."""
        envelope = received.envelope
        if envelope.sender == AGGREGATOR:
            return self._prepare_submission(received)
        job = self._job(envelope)
        algorithm = job.spec.algorithm
        if isinstance(envelope, UpdateEnvelope | EnsembleMemberEnvelope):
            wanted = (
                Algorithm.FEDAVG if isinstance(envelope, UpdateEnvelope) else Algorithm.ENSEMBLE
            )
            if algorithm is not wanted:
                raise EnvelopeError(
                    f"envelope.kind: {envelope.kind} does not belong to a {algorithm} job"
                )
            if (
                job.status is not Status.RUNNING
                or envelope.round != job.round
                or envelope.sender in job.contributors
            ):
                why = (
                    "a second one from this site"
                    if envelope.round == job.round and job.status is Status.RUNNING
                    else f"the job was {job.status} in round {job.round}"
                )
                note = (
                    f"{envelope.kind} from {envelope.sender} for round {envelope.round} "
                    f"arrived when {why}; not used"
                )
                return lambda: self._record_late(job, note)
            state = self._weights(job, received)
            return lambda: self._contribute(job, envelope.sender, state, envelope.sample_count)
        if isinstance(envelope, ModelEnvelope):
            spec = job.spec
            final = (spec.sites[-1], spec.rounds - 1, len(spec.sites))
            if (
                not algorithm.is_ring
                or (envelope.sender, envelope.round, envelope.hop) != final
                or job.status is not Status.RUNNING
            ):
                raise EnvelopeError(
                    f"envelope: the aggregator takes one model from a running ring job: from "
                    f"{final[0]!r} after cycle {final[1]} (hop {final[2]}); got one from "
                    f"{envelope.sender!r}, cycle {envelope.round}, hop {envelope.hop}"
                )
            state = self._weights(job, received)
            return lambda: self._evaluate(job, [state], [envelope.sender])
        if isinstance(envelope, MetricsEnvelope) and envelope.stage == "refused":
            if job.spec.ring_gate is None or job.status is not Status.RUNNING:
                raise EnvelopeError(
                    f"envelope.stage: job {job.spec.job_id} ({job.status}) takes no gate "
                    "refusals; it has no ring gate or is not running"
                )
            # Only the site at that ring position judges that hop, and the first is never.
            expected_hop(job.spec, envelope.sender, round=envelope.round, hop=envelope.hop)
            if arrival_before(job.spec, round=envelope.round, hop=envelope.hop) is None:
                raise EnvelopeError("envelope.hop: the ring's first hop is not judged")
            refusal = GateRefusal(
                site=envelope.sender,
                cycle=envelope.round,
                hop=envelope.hop,
                sender=previous_stop(job.spec, round=envelope.round, hop=envelope.hop),
                dice_mean=envelope.metrics.get("dice_mean", math.nan),
                reference_dice_mean=envelope.metrics.get("reference_dice_mean", math.nan),
            )
            return lambda: job.refused.append(refusal)
        if isinstance(envelope, MetricsEnvelope) and envelope.stage == "final":
            if job.status is not Status.EVALUATING:
                raise EnvelopeError(
                    f"final metrics for job {job.spec.job_id}, which is {job.status}"
                )
            return lambda: self._record_final(job, envelope)
        raise EnvelopeError(f"envelope.kind: the aggregator does not accept {envelope.kind} here")

    def _record_late(self, job: JobState, note: str) -> None:
        log.warning("job %s: %s", job.spec.job_id, note)
        job.late.append(note)

    def _contribute(self, job: JobState, site: str, state: StateDict, samples: int) -> None:
        job.contributors[site] = samples
        spec = job.spec
        if spec.max_update_norm is not None:
            norm = update_norm(job.reference, state)
            if norm > spec.max_update_norm:
                job.clipped[site] = norm
                state = clip_update(job.reference, state, spec.max_update_norm, norm=norm)
        if spec.algorithm is Algorithm.FEDAVG and spec.aggregation is Aggregation.MEAN:
            job.mean.add(state, samples)
        else:
            job.members[site] = state
        if len(job.contributors) == len(job.spec.sites):
            self._close_round(job, "all sites")

    def _close_round(self, job: JobState, closed_by: str) -> None:
        missing = [s for s in job.spec.sites if s not in job.contributors]
        job.rounds.append(
            RoundRecord(
                job.round,
                dict(job.contributors),
                missing,
                closed_by,
                self.clock() - job.round_started,
                dict(job.clipped),
            )
        )
        if job.spec.algorithm is Algorithm.ENSEMBLE:
            sites = [s for s in job.spec.sites if s in job.members]
            self._evaluate(job, [job.members[s] for s in sites], sites)
            return
        average = self._aggregate(job)
        if job.spec.server_momentum:
            job.reference, job.velocity = server_step(
                job.reference, average, job.velocity, momentum=job.spec.server_momentum
            )
        else:
            job.reference = average
        if job.round + 1 < job.spec.rounds:
            self._open_round(job, job.round + 1, encode(job.reference))
        else:
            self._evaluate(job, [job.reference], list(job.contributors))

    @staticmethod
    def _aggregate(job: JobState) -> StateDict:
        if job.spec.aggregation is Aggregation.MEAN:
            return job.mean.result()
        models = [job.members[site] for site in job.spec.sites if site in job.members]
        if job.spec.aggregation is Aggregation.MEDIAN:
            return coordinate_median(models)
        return trimmed_mean(models, job.spec.trim_fraction)

    def _evaluate(self, job: JobState, models: list[StateDict], sites: list[str]) -> None:
        job.status = Status.EVALUATING
        job.final, job.final_sites = models, sites
        job.deadline = self.clock() + job.spec.round_timeout_s
        payload = encode(bundle(models) if len(models) > 1 else models[0])
        for site in job.spec.sites:
            self._send(
                job,
                ModelEnvelope,
                payload,
                recipient=site,
                round=job.spec.rounds,
                task=Task.EVALUATE,
                members=len(models),
            )

    def _record_final(self, job: JobState, envelope: MetricsEnvelope) -> None:
        job.final_metrics[envelope.sender] = dict(envelope.metrics)
        job.final_counts[envelope.sender] = envelope.sample_count
        if len(job.final_metrics) == len(job.spec.sites):
            self._finish(job, Status.DONE, "")

    def _finish(self, job: JobState, status: Status, reason: str) -> None:
        job.status, job.reason, job.deadline = status, reason, None
        command = Command.JOB_DONE if status is Status.DONE else Command.JOB_FAILED
        if status is Status.FAILED:
            log.error("job %s failed: %s", job.spec.job_id, reason)
            for site in job.spec.sites:  # so that no site keeps the job's state
                self._send(
                    job, ControlEnvelope, b"", recipient=site, command=Command.CANCEL, reason=reason
                )
        if self.on_finish is not None:
            self.on_finish(job)
        self._send(
            job,
            ControlEnvelope,
            b"",
            recipient=EVENTS,
            command=command,
            reason=reason,
            round=job.round,
        )

    # -- deadlines -------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Close rounds whose deadline passed (with quorum), or fail them (without)."""
        for job in self.jobs.values():
            if job.deadline is None or now < job.deadline:
                continue
            if job.status is Status.EVALUATING:
                missing = [s for s in job.spec.sites if s not in job.final_metrics]
                job.late.append(f"final metrics missing from {missing} at the deadline")
                self._finish(job, Status.DONE, "")
            elif job.spec.algorithm.is_ring:
                self._finish(
                    job,
                    Status.FAILED,
                    f"the {job.spec.algorithm} token did not come back within "
                    f"{job.deadline - job.started:g} s; the last hop in the events shows "
                    "where it stopped",
                )
            elif len(job.contributors) >= job.spec.quorum:
                self._close_round(job, "deadline with quorum")
            else:
                self._finish(
                    job,
                    Status.FAILED,
                    f"round {job.round}: only {len(job.contributors)} site update(s) arrived "
                    f"within {job.spec.round_timeout_s:g} s (from "
                    f"{sorted(job.contributors)}), {job.spec.quorum} needed; check the "
                    "missing sites or lower min_sites",
                )
        deadlines = [j.deadline for j in self.jobs.values() if j.deadline is not None]
        return min(deadlines) if deadlines else None
