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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
    Detail,
    EnsembleMemberEnvelope,
    Envelope,
    JobSpecEnvelope,
    LineageEnvelope,
    MetricsEnvelope,
    ModelEnvelope,
    Step,
    Task,
    UpdateEnvelope,
    to_wire,
)
from relay.errors import ConfigError, EnvelopeError, JobFailed, TransportError
from relay.jobspec import Aggregation, Algorithm, JobSpec
from relay.lineage import EMPTY_DIGEST, model_digest
from relay.messaging import Received, check_chunking, sign
from relay.security import Security
from relay.topology import Topology
from relay.transport import Transport
from relay.validation import parse_json
from relay.workflows.ring import arrival_before, check_final, expected_hop, previous_stop
from relay.workflows.state import GateRefusal, JobState, RoundRecord, Status
from relay.workflows.store import JobStore

log = logging.getLogger(__name__)

OPERATOR_COMMANDS = (Command.CANCEL, Command.RESUME)
"""What the operator may ask of the aggregator about a job it runs."""


def _closed(job: JobState) -> bool:
    """The lineage has its final step: later steps are not part of it."""
    return any(record.get("step") == "final" for record in job.lineage)


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
        self.store = JobStore(spool)
        self.jobs: dict[str, JobState] = {job.spec.job_id: job for job in self.store.load()}
        self._submitted: dict[str, JobSpec] = self.store.held_submissions()
        now = self.clock()
        for job in self.jobs.values():
            if not job.finished and job.deadline is not None:
                # Time the aggregator was down is not the sites' to make up.
                job.deadline = max(job.deadline, now + job.spec.round_timeout_s)

    # -- restarting ------------------------------------------------------------------------

    def resume(self) -> int:
        """Finish the journal's messages, then send again what running jobs still wait for:
        the round's model to sites that have not answered, the final model to sites that
        have not scored it. Sites drop copies they already have (same job, round, digest)."""
        resumed = super().resume()
        for job in self.jobs.values():
            if job.finished:
                continue
            log.warning(
                "aggregator resumes job %s (%s) in %s %d, %s",
                job.spec.job_id,
                job.spec.algorithm,
                "cycle" if job.spec.algorithm.is_ring else "round",
                job.round,
                job.status,
            )
            self._announce(job, "job_resumed", round=job.round, reason="the aggregator restarted")
            if job.status is Status.EVALUATING:
                waiting = [s for s in job.spec.sites if s not in job.final_metrics]
                self._send_final(job, waiting)
            elif not job.spec.algorithm.is_ring:
                waiting = [s for s in job.spec.sites if s not in job.contributors]
                self._send_round(job, encode(job.reference), waiting)
        self.acted()
        return resumed

    def acted(self) -> None:
        """Save every job whose state changed."""
        for job in self.jobs.values():
            if job.dirty:
                self.store.save(job)

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
        job.dirty |= {"state", "reference"}
        try:
            self._start(job)
        except TransportError as e:
            job.status, job.reason = Status.FAILED, f"could not start the job: {e}"
            raise JobFailed(job.reason) from e
        finally:
            self.acted()
        return job

    def _announce(self, job: JobState, event: str, **detail: Detail) -> None:
        self.emit(event, job_id=job.spec.job_id, algorithm=job.spec.algorithm, facts=detail)

    def _record_step(
        self, job: JobState, step: Step, inputs: list[str], output: str, **fields: Any
    ) -> None:
        """Add the aggregator's own step to the job's lineage, signed where it signs."""
        envelope = LineageEnvelope(
            job_id=job.spec.job_id,
            algorithm=job.spec.algorithm,
            sender=AGGREGATOR,
            recipient=AGGREGATOR,
            round=job.round,
            payload_size=0,
            payload_digest=EMPTY_DIGEST,
            step=step,
            inputs=inputs,
            output=output,
            **fields,
        )
        if self.outbox.security is not None:
            envelope = sign(envelope, self.outbox.security)
        job.lineage.append(to_wire(envelope))
        job.dirty.add("state")

    def _start(self, job: JobState) -> None:
        spec, now = job.spec, job.started
        self._record_step(job, "initial", [], model_digest(job.reference))
        self._announce(
            job,
            "job_started",
            sites=",".join(spec.sites),
            rounds=spec.rounds,
            local_epochs=spec.training.local_epochs,
        )
        self._send_spec(job)
        payload = encode(job.reference)
        if spec.algorithm.is_ring:
            # Peers route the token; all the coordinator can watch is that it comes back.
            job.deadline = now + spec.round_timeout_s * spec.rounds * len(spec.sites)
            self._send(job, ModelEnvelope, payload, recipient=spec.sites[0], round=0, hop=0)
        else:
            self._open_round(job, 0, payload)

    def _send_spec(self, job: JobState) -> None:
        spec_json = job.spec.model_dump_json().encode()
        for site in job.spec.sites:
            # hop: a resumed job's spec must not look like a copy of the one sites forgot.
            self._send(job, JobSpecEnvelope, spec_json, recipient=site, hop=job.resumes)

    def _send(
        self,
        job: JobState,
        make: Callable[..., Envelope],
        payload: bytes | bytearray,
        **fields: Any,
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
        job.round_inputs = []
        budget = job.spec.rounds if job.spec.algorithm is Algorithm.ENSEMBLE else 1
        job.deadline = now + job.spec.round_timeout_s * budget
        job.dirty |= {"state", "reference", "velocity", "mean"}
        self._announce(job, "round_opened", round=round)
        self.acted()  # saved before the round's model goes out: a restart re-sends it
        self._send_round(job, payload, job.spec.sites)

    def _send_round(self, job: JobState, payload: bytes | bytearray, sites: Sequence[str]) -> None:
        before = dict(self.outbox.traffic.bytes)
        # hop: a resumed job's round is a new message for sites that trained it before.
        for site in sites:
            self._send(
                job, ModelEnvelope, payload, recipient=site, round=job.round, hop=job.resumes
            )
        self._sent(job, before, to=",".join(sites))

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
        if isinstance(envelope, ControlEnvelope) and envelope.command in OPERATOR_COMMANDS:
            if envelope.job_id not in self.jobs:
                raise EnvelopeError(
                    f"{envelope.command}: job {envelope.job_id} is not one this aggregator "
                    f"knows (jobs: {sorted(self.jobs)[-10:]})"
                )
            return
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

    def _prepare_submission(self, received: Received) -> Action | None:
        envelope = received.envelope
        if isinstance(envelope, ControlEnvelope):
            return self._prepare_command(self.jobs[envelope.job_id], envelope)
        if isinstance(envelope, JobSpecEnvelope):
            submitted = parse_json(JobSpec, bytes(received.payload), what="job")
            if submitted.job_id != envelope.job_id:
                raise EnvelopeError(f"job.job_id {submitted.job_id!r} differs from the envelope's")
            return lambda: self._hold_submission(submitted)
        if envelope.job_id in self.jobs:  # resumed: it started before the crash
            return None
        spec = self._submitted.get(envelope.job_id)
        if spec is None:
            raise EnvelopeError(
                f"job {envelope.job_id}: its initial model came without its job spec; submit "
                "the job again"
            )
        initial = decode(received.payload)
        bad = [n for n, t in initial.items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise EnvelopeError(f"initial model: tensors {bad[:5]} hold NaN or infinite values")
        return lambda: self._start_submitted(spec, initial)

    def _prepare_command(self, job: JobState, envelope: ControlEnvelope) -> Action:
        """The operator's ``job cancel`` or ``job resume``."""
        why = envelope.reason or "no reason given"
        if envelope.command is Command.CANCEL:
            if job.finished:
                raise EnvelopeError(f"cancel: job {job.spec.job_id} is already {job.status}")
            return lambda: self._cancel(job, why)
        if job.status not in (Status.FAILED, Status.CANCELLED):
            raise EnvelopeError(
                f"resume: job {job.spec.job_id} is {job.status}; only a failed or cancelled "
                "job can be resumed"
            )
        if job.spec.algorithm.is_ring:
            raise EnvelopeError(
                f"resume: job {job.spec.job_id} is {job.spec.algorithm}, whose model travels "
                "from site to site and is gone once the job stopped; submit it again"
            )
        if not job.reference:
            raise EnvelopeError(f"resume: job {job.spec.job_id} has no saved model to resume")
        return lambda: self._resume_job(job, why, request=envelope.message_id)

    def _cancel(self, job: JobState, reason: str) -> None:
        log.warning("job %s cancelled by the operator: %s", job.spec.job_id, reason)
        self._announce(job, "job_cancelled", round=job.round, reason=reason)
        self._finish(job, Status.CANCELLED, f"cancelled by the operator: {reason}")

    def _resume_job(self, job: JobState, reason: str, *, request: str) -> None:
        """Run a failed or cancelled job on, from the start of the round it stopped in."""
        job.resumes += 1
        job.status, job.reason = Status.RUNNING, ""
        log.warning("job %s resumed in round %d: %s", job.spec.job_id, job.round, reason)
        self._announce(job, "job_resumed", round=job.round, reason=reason, request=request)
        self._send_spec(job)  # sites forgot the job when it stopped
        if job.final:  # it stopped while the sites scored the final model
            self._evaluate(job, job.final, job.final_sites)
        else:
            self._open_round(job, job.round, encode(job.reference))

    def _hold_submission(self, spec: JobSpec) -> None:
        self.store.hold_submission(spec)
        self._submitted[spec.job_id] = spec

    def _start_submitted(self, spec: JobSpec, initial: StateDict) -> None:
        try:
            if spec.job_id not in self.jobs:  # else started before a crash: it resumes
                self.submit(spec, initial)  # saves the job's state, even if it fails
        except ConfigError as e:
            log.error("job %s refused: %s", spec.job_id, e)
            self.rejected.append(str(e))
        # Any other error (the spool full before the job was saved) keeps the spec: the
        # journalled initial model starts the job after the restart.
        del self._submitted[spec.job_id]
        self.store.drop_submission(spec.job_id)

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
        if envelope.message_id in job.applied:
            return None  # applied and saved before a crash that came before the journal's end
        action = self._prepare_for(job, received)
        if action is None:
            return None

        def applied() -> None:
            # Marked first: a state saved while acting (before its messages go out) must
            # already say this message is in it.
            job.applied[envelope.message_id] = None
            job.dirty.add("state")
            action()

        return applied

    def _prepare_for(self, job: JobState, received: Received) -> Action | None:
        envelope = received.envelope
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
                or envelope.hop != job.resumes
                or envelope.sender in job.contributors
            ):
                if envelope.hop != job.resumes:
                    why = f"the job had been resumed since (resumption {job.resumes})"
                elif envelope.round == job.round and job.status is Status.RUNNING:
                    why = "a second one from this site"
                else:
                    why = f"the job was {job.status} in round {job.round}"
                note = (
                    f"{envelope.kind} from {envelope.sender} for round {envelope.round} "
                    f"arrived when {why}; not used"
                )
                return lambda: self._record_late(job, note)
            state = self._weights(job, received)
            return lambda: self._contribute(job, envelope.sender, state, envelope.sample_count)
        if isinstance(envelope, ModelEnvelope):
            if not algorithm.is_ring or job.status is not Status.RUNNING:
                raise EnvelopeError(
                    f"envelope: the aggregator takes a model only from a running ring job; job "
                    f"{job.spec.job_id} is {algorithm}, {job.status}"
                )
            check_final(job.spec, envelope.sender, round=envelope.round, hop=envelope.hop)
            state = self._weights(job, received)
            return lambda: self._evaluate(job, [state], [envelope.sender])
        if isinstance(envelope, LineageEnvelope):
            if envelope.step != "train":
                raise EnvelopeError(
                    f"lineage.step: a site records train steps, not {envelope.step}"
                )
            made = {record["output"] for record in job.lineage}
            unknown = [d[:12] for d in envelope.inputs if d not in made]
            if unknown:
                # Steps arrive in causal order (a site records its step before its model
                # leaves): one from a model no step made is broken or forged.
                raise EnvelopeError(
                    f"lineage.inputs: {unknown} were made by no step of job {job.spec.job_id}"
                )
            return lambda: self._record_site_step(job, envelope)
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
            return lambda: self._record_refusal(job, refusal)
        if isinstance(envelope, MetricsEnvelope) and envelope.stage == "final":
            if job.status is not Status.EVALUATING:
                raise EnvelopeError(
                    f"final metrics for job {job.spec.job_id}, which is {job.status}"
                )
            return lambda: self._record_final(job, envelope)
        raise EnvelopeError(f"envelope.kind: the aggregator does not accept {envelope.kind} here")

    def _record_site_step(self, job: JobState, envelope: LineageEnvelope) -> None:
        if _closed(job):
            # After the final step the lineage is closed; a straggler's step is noted only.
            self._record_late(
                job,
                f"lineage step from {envelope.sender} (round {envelope.round}) arrived after "
                "the final model; not in the lineage",
            )
            return
        job.lineage.append(to_wire(envelope))
        job.dirty.add("state")

    def _record_late(self, job: JobState, note: str) -> None:
        log.warning("job %s: %s", job.spec.job_id, note)
        job.late.append(note)
        job.dirty.add("state")
        self._announce(job, "late", note=note)

    def _record_refusal(self, job: JobState, refusal: GateRefusal) -> None:
        job.refused.append(refusal)
        self._announce(job, "hop_refused", **refusal.model_dump())

    def _contribute(self, job: JobState, site: str, state: StateDict, samples: int) -> None:
        job.contributors[site] = samples
        job.round_inputs.append(model_digest(state))  # as the site sent it, before any clipping
        job.dirty.add("state")
        spec = job.spec
        if spec.max_update_norm is not None:
            norm = update_norm(job.reference, state)
            if norm > spec.max_update_norm:
                job.clipped[site] = norm
                state = clip_update(job.reference, state, spec.max_update_norm, norm=norm)
        if spec.algorithm is Algorithm.FEDAVG and spec.aggregation is Aggregation.MEAN:
            # Streaming: one running sum, however many sites.
            job.mean.add(state, samples)
            job.dirty.add("mean")
        else:
            # Robust aggregation needs every update at once, an ensemble every member: the
            # store writes each to its own file once, and they are read back from there.
            job.members[site] = state
        if len(job.contributors) == len(job.spec.sites):
            self._close_round(job, "all sites")

    def _close_round(self, job: JobState, closed_by: str) -> None:
        missing = [s for s in job.spec.sites if s not in job.contributors]
        record = RoundRecord(
            job.round,
            dict(job.contributors),
            missing,
            closed_by,
            self.clock() - job.round_started,
            dict(job.clipped),
        )
        job.rounds.append(record)
        self._announce(
            job,
            "round_closed",
            round=record.round,
            contributors=",".join(record.contributors),
            missing=",".join(missing),
            closed_by=closed_by,
            seconds=round(record.seconds, 3),
        )
        if job.spec.algorithm is Algorithm.ENSEMBLE:
            sites = [s for s in job.spec.sites if s in job.members]
            self._evaluate(job, [dict(job.members[s]) for s in sites], sites)
            return
        average = self._aggregate(job)
        job.dirty |= {"reference", "velocity"}
        if job.spec.server_momentum:
            job.reference, job.velocity = server_step(
                job.reference, average, job.velocity, momentum=job.spec.server_momentum
            )
        else:
            job.reference = average
        self._record_step(
            job,
            "aggregate",
            job.round_inputs,
            model_digest(job.reference),
            sample_count=sum(job.contributors.values()),
        )
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
        job.dirty |= {"state", "final"}
        if not _closed(job):
            whole = bundle(models) if len(models) > 1 else models[0]
            inputs = [model_digest(m) for m in models]
            self._record_step(job, "final", inputs, model_digest(whole))
        self._announce(job, "evaluating", members=len(models))
        self.acted()
        self._send_final(job, job.spec.sites)

    def _send_final(self, job: JobState, sites: Sequence[str]) -> None:
        models = job.final
        before = dict(self.outbox.traffic.bytes)
        payload = encode(bundle(models) if len(models) > 1 else models[0])
        for site in sites:
            self._send(
                job,
                ModelEnvelope,
                payload,
                recipient=site,
                round=job.spec.rounds,
                hop=job.resumes,
                task=Task.EVALUATE,
                members=len(models),
            )
        self._sent(job, before, to=",".join(sites))

    def _sent(self, job: JobState, before: dict[str, int], *, to: str) -> None:
        """A ``sent`` event: the bytes published since ``before``, by message kind."""
        self._announce(
            job, "sent", to=to, round=job.round, **self.outbox.traffic.moved_since(before)
        )

    def _record_final(self, job: JobState, envelope: MetricsEnvelope) -> None:
        job.dirty.add("state")
        job.final_metrics[envelope.sender] = dict(envelope.metrics)
        job.final_counts[envelope.sender] = envelope.sample_count
        if len(job.final_metrics) == len(job.spec.sites):
            self._finish(job, Status.DONE, "")

    def _finish(self, job: JobState, status: Status, reason: str) -> None:
        job.status, job.reason, job.deadline = status, reason, None
        job.dirty.add("state")
        # The results first, then the state (a done job's saved models are dropped), then
        # the messages: a crash in between finishes the job again from the journal.
        if self.on_finish is not None:
            self.on_finish(job)
        self.acted()
        self.drop_transfers(job.spec.job_id)
        command = Command.JOB_DONE if status is Status.DONE else Command.JOB_FAILED
        if status is not Status.DONE:
            log.error("job %s %s: %s", job.spec.job_id, status, reason)
            for site in job.spec.sites:  # so that no site keeps the job's state
                self._send(
                    job, ControlEnvelope, b"", recipient=site, command=Command.CANCEL, reason=reason
                )
        cases = sum(job.final_counts.get(site, 0) for site in job.final_metrics)
        dice = sum(
            m.get("dice_mean", 0.0) * job.final_counts.get(site, 0)
            for site, m in job.final_metrics.items()
        )
        self._announce(
            job,
            "job_finished",
            status=str(status),
            reason=reason[:4000],
            dice_mean=dice / cases if cases else None,
        )
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
        self.acted()
        deadlines = [j.deadline for j in self.jobs.values() if j.deadline is not None]
        return min(deadlines) if deadlines else None
