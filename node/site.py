"""A site: receives models, trains them on its own data, sends them on. Images never leave.

Per message: verify → ack → evaluate the received model → train → publish the result (to
the aggregator for FedAvg and ensembles; to the next site of the ring for SWT and CWT). Every
model it receives and trains is measured on the site's validation split and published as a
metrics event.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.algo import AlgoFactory, SiteAlgo
from node.models import initial_weights
from relay.aggregation import check_compatible, unbundle
from relay.codec import Encoding, StateDict, decode, digest
from relay.endpoint import Action, Endpoint
from relay.envelope import (
    AGGREGATOR,
    EVENTS,
    Command,
    ControlEnvelope,
    Detail,
    EnsembleMemberEnvelope,
    Envelope,
    EnvelopeBase,
    JobSpecEnvelope,
    LineageEnvelope,
    MetricsEnvelope,
    ModelEnvelope,
    Task,
    UpdateEnvelope,
)
from relay.errors import ConfigError, EnvelopeError
from relay.jobspec import AbsentSite, Algorithm, JobSpec
from relay.lineage import model_digest
from relay.messaging import Received, check_chunking
from relay.privacy import epsilon, privatize, release_key, releases, site_secret
from relay.security import Security
from relay.storage import replace_file
from relay.topology import Topology
from relay.transport import Transport
from relay.validation import parse_json
from relay.workflows.handoff import GRACE, Handoff, Handoffs
from relay.workflows.ring import (
    Stop,
    arrival_before,
    check_revisit,
    expected_hop,
    next_stop,
    previous_stop,
    reference_stop,
    senders,
    skip,
)

log = logging.getLogger(__name__)


def round_to_ms(seconds: float) -> float:
    """Seconds to the millisecond, for events."""
    return float(f"{seconds:.3f}")


class SiteNode(Endpoint):
    """One hospital's node: a transport connection, its training algorithm, and its jobs."""

    def __init__(
        self,
        *,
        name: str,
        algo_factory: AlgoFactory,
        transport: Transport,
        topology: Topology,
        spool: Path,
        security: Security | None = None,
        describe: Callable[[], dict[str, Detail]] | None = None,
    ) -> None:
        super().__init__(
            name=name, transport=transport, topology=topology, spool=spool, security=security
        )
        self.algo_factory = algo_factory
        self.describe = describe
        """What this site answers a preflight probe with (its data, device, disk)."""
        self.jobs: dict[str, JobSpec] = {}
        self.algos: dict[str, SiteAlgo] = {}
        self._references: dict[str, StateDict] = {}
        self._ring_position: dict[str, tuple[int, int]] = {}
        self._gate_references: dict[str, dict[tuple[int, int], tuple[StateDict, str]]] = {}
        """Per gated ring job and (cycle, hop) to come: the model sent to this hop's sender,
        and its encoding's sha256."""
        self._noise_secret: bytes | None = None  # read from the spool when first needed
        self._jobs_dir = spool / "jobs"
        self._jobs_dir.mkdir(parents=True, exist_ok=True)
        self.handoffs = Handoffs(spool / "handoffs")
        """Ring tokens sent under absent_site skip/revisit and not yet taken."""
        self._reload_jobs()

    def _reload_jobs(self) -> None:
        # Jobs this site had accepted before a restart; their unfinished messages are in the
        # journal and need them.
        for path in sorted(self._jobs_dir.glob("*.json")):
            record = json.loads(path.read_text())
            spec = JobSpec.model_validate(record["spec"])
            try:
                self.algos[spec.job_id] = self.algo_factory(spec)
            except ConfigError as e:
                log.error("site %s cannot resume job %s: %s", self.name, spec.job_id, e)
                continue
            self.jobs[spec.job_id] = spec
            if record.get("position") is not None:
                self._ring_position[spec.job_id] = tuple(record["position"])

    def _save_job(self, job_id: str) -> None:
        record = {
            "spec": self.jobs[job_id].model_dump(mode="json"),
            "position": self._ring_position.get(job_id),
        }
        replace_file(self._jobs_dir / f"{job_id}.json", json.dumps(record).encode())

    def screen(self, envelope: Envelope) -> None:
        """Refuse, before anything is stored, what no site should accept from this sender."""
        if isinstance(envelope, ControlEnvelope) and envelope.command is Command.PROBE:
            # A probe belongs to no job: `fedrelay preflight` asks before any job is sent.
            if envelope.sender != AGGREGATOR or envelope.is_chunked:
                raise EnvelopeError(
                    f"envelope.command: a probe comes from the aggregator, unchunked; got one "
                    f"from {envelope.sender!r} in {envelope.chunk_count} chunk(s)"
                )
            return
        if isinstance(envelope, JobSpecEnvelope):
            if envelope.sender != AGGREGATOR:
                raise EnvelopeError(
                    f"envelope.sender: only the aggregator sends job specs, got {envelope.sender!r}"
                )
            return
        job = self.jobs.get(envelope.job_id)
        if job is None:
            raise EnvelopeError(
                f"envelope.job_id: {envelope.job_id!r} is unknown to site {self.name!r}; the "
                "job spec must arrive first (was it submitted to this federation?)"
            )
        check_chunking(envelope, job.chunk_size)
        if isinstance(envelope, ModelEnvelope):
            self._check_route(job, envelope)
        elif isinstance(envelope, ControlEnvelope) and envelope.command is Command.HOP_TAKEN:
            if job.absent_site is AbsentSite.WAIT or envelope.sender not in job.sites:
                raise EnvelopeError(
                    f"envelope.command: hop_taken comes from a site of a ring job that skips "
                    f"absent sites; job {job.job_id} is {job.algorithm}, absent_site "
                    f"{job.absent_site}, and {envelope.sender!r} sent it"
                )
        elif not isinstance(envelope, ControlEnvelope) or envelope.sender != AGGREGATOR:
            raise EnvelopeError(
                f"envelope.kind: a site does not accept {envelope.kind} from {envelope.sender!r}"
            )

    def _check_route(self, job: JobSpec, envelope: ModelEnvelope) -> None:
        single = envelope.task is not Task.EVALUATE
        if single and envelope.members != 1:
            raise EnvelopeError(
                f"envelope.members: a model to {envelope.task} is a single model, got "
                f"{envelope.members}"
            )
        if not single and envelope.members > len(job.sites):
            raise EnvelopeError(
                f"envelope.members: got {envelope.members}, the job has {len(job.sites)} sites"
            )
        if envelope.task is Task.EVALUATE or not job.algorithm.is_ring:
            expected = frozenset({AGGREGATOR})
        else:
            if envelope.task is Task.REFERENCE:
                expected = frozenset({self._reference_sender(job, envelope)})
            else:
                expected_hop(job, self.name, round=envelope.round, hop=envelope.hop)
                expected = senders(job, round=envelope.round, hop=envelope.hop)
            check_revisit(job, hop=envelope.hop, revisit=envelope.revisit)
            last = self._ring_position.get(job.job_id)
            if last is not None and (envelope.round, envelope.hop) <= last:
                moving = job.absent_site is not AbsentSite.WAIT and envelope.sender in job.sites
                if moving and envelope.task is Task.TRAIN and envelope.chunk_index == 0:
                    # This site is here: its sender must not skip it and send a second token
                    # on past it (two tokens would race round the ring).
                    self._answer_taken(job, envelope)
                raise EnvelopeError(
                    f"envelope.round/hop: cycle {envelope.round} hop {envelope.hop} was already "
                    f"trained here (last: cycle {last[0]} hop {last[1]}); a second "
                    f"{envelope.task} for it is stale (a second token would fork the ring)"
                )
        if envelope.sender not in expected:
            raise EnvelopeError(
                f"envelope.sender: this {job.algorithm} model must come from "
                f"{' or '.join(map(repr, sorted(expected)))}, got {envelope.sender!r}"
            )

    def _reference_sender(self, job: JobSpec, envelope: ModelEnvelope) -> str:
        """Who sends the gate's reference for the hop at (round, hop): the site two back."""
        if job.ring_gate is None:
            raise EnvelopeError(f"envelope.task: job {job.job_id} has no ring gate to refer to")
        expected_hop(job, self.name, round=envelope.round, hop=envelope.hop)
        before = arrival_before(job, round=envelope.round, hop=envelope.hop)
        sender = None if before is None else previous_stop(job, round=before[0], hop=before[1])
        if sender is None or sender == AGGREGATOR:
            raise EnvelopeError(
                f"envelope.task: no site sends a reference for cycle {envelope.round} hop "
                f"{envelope.hop} (the ring's start is judged against the job's initial model)"
            )
        return sender

    def prepare(self, received: Received) -> Action | None:
        """Accept job specs, models to train or evaluate, and cancellations."""
        envelope = received.envelope
        if isinstance(envelope, JobSpecEnvelope):
            spec = parse_json(JobSpec, bytes(received.payload), what="job")
            self._check_spec(spec, envelope)
            try:
                algo = self.algo_factory(spec)
            except ConfigError as e:
                raise EnvelopeError(
                    f"job {spec.job_id}: site {self.name!r} cannot run it: {e}"
                ) from e
            return lambda: self._add_job(spec, algo)
        if isinstance(envelope, ControlEnvelope) and envelope.command is Command.PROBE:
            return lambda: self._answer_probe(envelope)
        job = self.jobs.get(envelope.job_id)
        if job is None:  # only on resume: the job ended before the crash
            raise EnvelopeError(f"envelope.job_id: job {envelope.job_id} is over at this site")
        if isinstance(envelope, ControlEnvelope):
            if envelope.command is Command.CANCEL:
                return lambda: self._forget(job.job_id)
            if envelope.command is Command.HOP_TAKEN:
                return lambda: self._taken(job, envelope)
            return None
        assert isinstance(envelope, ModelEnvelope)  # screen() let nothing else through
        members = unbundle(decode(received.payload), envelope.members)
        reference = self._reference(job)
        for i, member in enumerate(members):
            check_compatible(reference, member, who=f"model from {envelope.sender!r} member {i}")
        if envelope.task is Task.EVALUATE:
            return lambda: self._evaluate_final(job, envelope, members)
        if envelope.task is Task.REFERENCE:
            at = (envelope.round, envelope.hop)
            kept = (members[0], digest(received.payload))
            return lambda: self._gate_references.setdefault(job.job_id, {}).__setitem__(at, kept)
        if job.algorithm.is_ring:
            self._ring_position[job.job_id] = (envelope.round, envelope.hop)
            self._save_job(job.job_id)
        gated = job.algorithm.is_ring and job.ring_gate is not None
        basis = digest(received.payload) if gated else None
        if job.algorithm.is_ring and job.absent_site is not AbsentSite.WAIT:
            return lambda: self._take(job, envelope, members[0])
        return lambda: self._train(job, envelope, members[0], basis)

    def _take(self, job: JobSpec, envelope: ModelEnvelope, weights: StateDict) -> None:
        """Tell the sender the token is stored here (so it does not skip this site), then
        train it."""
        self._answer_taken(job, envelope)
        self._train(job, envelope, weights, None)

    def _answer_taken(self, job: JobSpec, envelope: ModelEnvelope) -> None:
        """``hop_taken`` to a ring token's sender: this site has the token for that stop."""
        if envelope.sender not in (AGGREGATOR, self.name):
            self._publish(
                job,
                ControlEnvelope,
                recipient=envelope.sender,
                round=envelope.round,
                hop=envelope.hop,
                command=Command.HOP_TAKEN,
            )

    def _taken(self, job: JobSpec, word: ControlEnvelope) -> None:
        """The site the token went to has stored it: the kept copy is not needed."""
        held = self.handoffs.get(job.job_id)
        if held is not None and (held.stop.recipient, held.stop.round, held.stop.hop) == (
            word.sender,
            word.round,
            word.hop,
        ):
            self.handoffs.release(job.job_id)
            return
        if held is not None and word.sender in held.skipped:
            # It took the token after its deadline, and sent it on: the copy sent past it is
            # a second token. Whichever reaches the next site first goes on; the other is
            # refused there as stale. Nothing more to do here.
            self.handoffs.release(job.job_id)
        log.warning(
            "site %s: %s took job %s's token (cycle %d hop %d) after it was skipped",
            self.name,
            word.sender,
            job.job_id,
            word.round,
            word.hop,
        )
        self.emit(
            "hop_taken_late",
            job_id=job.job_id,
            algorithm=job.algorithm,
            site=word.sender,
            round=word.round,
            hop=word.hop,
        )

    def tick(self, now: float) -> float | None:
        """Skip the site a held token went to, once its time is up; return the next
        deadline."""
        for held in self.handoffs.pending():
            if held.deadline > now:
                return held.deadline
            job = self.jobs.get(held.job_id)
            if job is None or job.hop_timeout_s is None:  # the job is over here
                self.handoffs.release(held.job_id)
                continue
            self._skip(job, held)
        following = self.handoffs.pending()
        return following[0].deadline if following else None

    def _skip(self, job: JobSpec, held: Handoff) -> None:
        stop = skip(job, held.stop)
        log.warning(
            "site %s: %s did not take job %s's token (cycle %d hop %d) in %g s; sending it "
            "on to %s (cycle %d hop %d)",
            self.name,
            held.stop.recipient,
            job.job_id,
            held.stop.round,
            held.stop.hop,
            job.hop_timeout_s,
            stop.recipient,
            stop.round,
            stop.hop,
        )
        self.emit(
            "hop_skipped",
            job_id=job.job_id,
            algorithm=job.algorithm,
            site=held.stop.recipient,
            round=held.stop.round,
            hop=held.stop.hop,
            to=stop.recipient,
            to_round=stop.round,
            to_hop=stop.hop,
            revisit=",".join(stop.revisit),
        )
        weights = self.handoffs.weights(job.job_id)
        self._send_token(job, stop, weights, skipped=(*held.skipped, held.stop.recipient))

    def _send_token(
        self,
        job: JobSpec,
        stop: Stop,
        weights: StateDict,
        *,
        skipped: tuple[str, ...] = (),
        basis: str | None = None,
    ) -> None:
        """Send the ring token to ``stop``. When the job skips absent sites, a copy is kept
        until that site says it took it, and the message lives only ``hop_timeout_s``: a site
        that is back too late finds nothing, and the token cannot fork."""
        timeout = job.hop_timeout_s
        kept = timeout is not None and stop.recipient not in (AGGREGATOR, self.name)
        if kept:
            assert timeout is not None
            held = Handoff(
                job.job_id, stop, time.time() + timeout * (1 + GRACE), skipped, sent=False
            )
            self.handoffs.hold(held, weights)
        self._publish(
            job,
            ModelEnvelope,
            Encoding(weights),
            expiration_s=timeout if kept else None,
            recipient=stop.recipient,
            round=stop.round,
            hop=stop.hop,
            revisit=stop.revisit,
            basis_digest=basis,
        )
        if kept:
            assert timeout is not None  # the deadline counts from when the whole token is out
            self.handoffs.hold(
                Handoff(job.job_id, stop, time.time() + timeout * (1 + GRACE), skipped)
            )
        else:
            self.handoffs.release(job.job_id)

    def resume(self) -> int:
        """The journal's unfinished messages, then the hand-offs a crash cut short while their
        token was being published: sent again (a copy the next site has is dropped there)."""
        resumed = super().resume()
        for held in self.handoffs.pending():
            job = self.jobs.get(held.job_id)
            if job is not None and not held.sent:
                log.warning(
                    "site %s sends job %s's token to %s (cycle %d hop %d) again: it was being "
                    "published when the site stopped",
                    self.name,
                    job.job_id,
                    held.stop.recipient,
                    held.stop.round,
                    held.stop.hop,
                )
                with self.journal.writing():
                    weights = self.handoffs.weights(job.job_id)
                    self._send_token(job, held.stop, weights, skipped=held.skipped)
        return resumed

    def _answer_probe(self, probe: ControlEnvelope) -> None:
        """Publish a ``preflight`` event describing this site, under the probe's id."""
        detail: dict[str, Detail] = {"site": self.name}
        if self.describe is not None:
            try:
                detail = self.describe()
            except Exception as e:  # a probe must never stop the node: say what failed
                detail["error"] = f"{type(e).__name__}: {e}"[:4000]
        self.emit("preflight", job_id=probe.job_id, facts=detail)

    def _publish(
        self,
        job: JobSpec,
        make: Callable[..., EnvelopeBase],
        payload: bytes | Encoding = b"",
        **fields: Any,
    ) -> None:
        """Send one of ``job``'s messages, in its chunk size."""
        self.outbox.send(
            make,
            payload,
            chunk_size=job.chunk_size,
            job_id=job.job_id,
            algorithm=job.algorithm,
            **fields,
        )

    def _check_spec(self, spec: JobSpec, envelope: JobSpecEnvelope) -> None:
        if spec.job_id != envelope.job_id or spec.algorithm is not envelope.algorithm:
            raise EnvelopeError(
                f"job: job_id/algorithm {spec.job_id!r}/{spec.algorithm} differ from the "
                f"envelope's {envelope.job_id!r}/{envelope.algorithm}"
            )
        if self.name not in spec.sites:
            raise EnvelopeError(f"job.sites {list(spec.sites)} does not include {self.name!r}")
        if spec.federation != self.topology.federation:
            raise EnvelopeError(
                f"job.federation {spec.federation!r} is not {self.topology.federation!r}"
            )

    def _reference(self, job: JobSpec) -> StateDict:
        # The names, shapes and dtypes this job's model must have: any model that differs is
        # refused before training, so a broken or hostile sender cannot crash the site.
        if job.job_id not in self._references:
            self._references[job.job_id] = initial_weights(job.model, seed=job.seed)
        return self._references[job.job_id]

    def _add_job(self, spec: JobSpec, algo: SiteAlgo) -> None:
        self.jobs[spec.job_id] = spec
        self.algos[spec.job_id] = algo
        self._save_job(spec.job_id)

    def _forget(self, job_id: str) -> None:
        # The job's files first, its record last: a crash in between forgets it again when
        # the journalled message that ended it is resumed.
        self.drop_transfers(job_id)
        self.handoffs.release(job_id)
        (self._jobs_dir / f"{job_id}.json").unlink(missing_ok=True)
        self.jobs.pop(job_id, None)
        self._references.pop(job_id, None)
        self._ring_position.pop(job_id, None)
        self._gate_references.pop(job_id, None)
        algo = self.algos.pop(job_id, None)
        if algo is not None:
            algo.finalize(job_id)

    def _secret(self) -> bytes:
        if self._noise_secret is None:
            self._noise_secret = site_secret(self.spool)
        return self._noise_secret

    def _metrics(
        self,
        job: JobSpec,
        stage: str,
        metrics: dict[str, float],
        *,
        round: int,
        hop: int,
        recipient: str = EVENTS,
    ) -> None:
        self._publish(
            job,
            MetricsEnvelope,
            recipient=recipient,
            round=round,
            hop=hop,
            stage=stage,
            sample_count=self.algos[job.job_id].validation_count,
            metrics=metrics,
        )

    def _evaluate_final(
        self, job: JobSpec, envelope: ModelEnvelope, members: list[StateDict]
    ) -> None:
        dice = self.algos[job.job_id].evaluate(members)
        self._metrics(
            job,
            "final",
            dice.as_dict(),
            round=envelope.round,
            hop=envelope.hop,
            recipient=AGGREGATOR,
        )
        # The final evaluation is the last thing a job asks of a site.
        self._forget(job.job_id)

    def _gate(
        self,
        job: JobSpec,
        envelope: ModelEnvelope,
        received: tuple[StateDict, str | None],
        score: dict[str, float],
    ) -> tuple[StateDict, str | None]:
        """The ring gate: the received model, or, if it scores more than ``ring_gate`` below
        the model its sender was sent (the reference), that one; a refusal is reported to the
        aggregator for the results. Returns the model to train and its encoding's sha256."""
        assert job.ring_gate is not None
        at = (envelope.round, envelope.hop)
        kept: tuple[StateDict, str | None] | None
        kept = self._gate_references.get(job.job_id, {}).pop(at, None)
        if kept is None and arrival_before(job, round=at[0], hop=at[1]) == (0, 0):
            kept = (self._reference(job), None)  # the ring's first model: the job's initial one
        if kept is None:
            problem = "no reference arrived (lost in a restart?)"
        elif kept[1] is not None and envelope.basis_digest != kept[1]:
            problem = "the reference is not the model the sender says it trained from"
        else:
            problem = None
        if kept is None or problem is not None:
            log.warning(
                "site %s: %s for cycle %d hop %d; the hop from %s is taken unchecked",
                self.name,
                problem,
                *at,
                envelope.sender,
            )
            return received
        algo = self.algos[job.job_id]
        reference = algo.evaluate([kept[0]]).as_dict().get("dice_mean")
        dice = score.get("dice_mean")
        if reference is None or dice is None:
            raise ConfigError(
                f"job {job.job_id}: ring_gate needs this site's evaluate() to report dice_mean"
            )
        if dice >= reference - job.ring_gate:
            return received
        log.warning(
            "site %s refuses the model from %s (cycle %d hop %d): Dice %.3f, %.3f below the "
            "%.3f of the model it was sent; training that one instead",
            self.name,
            envelope.sender,
            *at,
            dice,
            reference - dice,
            reference,
        )
        refusal = {"dice_mean": dice, "reference_dice_mean": reference}
        self._metrics(job, "refused", refusal, round=at[0], hop=at[1], recipient=AGGREGATOR)
        return kept

    def _train(
        self, job: JobSpec, envelope: ModelEnvelope, weights: StateDict, basis: str | None
    ) -> None:
        round, hop = envelope.round, envelope.hop
        started = time.monotonic()
        algo = self.algos[job.job_id]
        score = algo.evaluate([weights]).as_dict()
        self._metrics(job, "received", score, round=round, hop=hop)
        if basis is not None and arrival_before(job, round=round, hop=hop) is not None:
            weights, basis = self._gate(job, envelope, (weights, basis), score)
        received = weights
        passes = job.rounds if job.algorithm is Algorithm.ENSEMBLE else 1
        for step in range(passes):
            at = step if job.algorithm is Algorithm.ENSEMBLE else round
            result = algo.train(
                weights, epochs=job.training.local_epochs, job_id=job.job_id, round=at
            )
            weights = result.weights
            if job.privacy is None:
                trained = algo.evaluate([weights]).as_dict() | {"loss": result.loss}
            elif step < passes - 1:
                continue  # a model that never leaves the site: its scores do not either
            else:
                # Only what derives from the noised model leaves the site (its training
                # loss does not): scores of the model as sent, and the privacy now spent.
                key = release_key(self._secret(), job_id=job.job_id, round=round, hop=hop)
                weights = privatize(received, weights, job.privacy, key=key)
                # A resumed FedAvg or ensemble job may have this site release a round again,
                # with fresh noise: counted as one more release each time (an upper bound).
                again = 0 if job.algorithm.is_ring else hop
                spent = epsilon(releases(job, round=at) + again, job.privacy)
                trained = algo.evaluate([weights]).as_dict() | {"epsilon": spent}
            self._metrics(job, "trained", trained, round=at, hop=hop)
        make: Callable[..., EnvelopeBase] = ModelEnvelope
        stop: Stop | None = None
        if job.algorithm is Algorithm.FEDAVG:
            make = UpdateEnvelope
            # hop: which of the job's resumptions this update answers (0 until resumed).
            where: dict[str, object] = {"recipient": AGGREGATOR, "round": round, "hop": hop}
        elif job.algorithm is Algorithm.ENSEMBLE:
            make = EnsembleMemberEnvelope
            where = {"recipient": AGGREGATOR, "hop": hop}
        else:
            stop = next_stop(job, round=round, hop=hop, revisit=envelope.revisit)
            where = {"recipient": stop.recipient}
        if not job.algorithm.is_ring:
            where |= {"sample_count": result.sample_count, "metrics": trained}
        published = dict(self.outbox.traffic.bytes)
        # The step goes on record before the model leaves: the aggregator has every step of
        # a model's history by the time the model reaches it.
        self._publish(
            job,
            LineageEnvelope,
            recipient=AGGREGATOR,
            round=round,
            hop=hop,
            step="train",
            inputs=[model_digest(received)],
            output=model_digest(weights),
            sample_count=result.sample_count,
            validation_count=algo.validation_count,
            metrics={k: v for k, v in trained.items() if math.isfinite(v)},
        )
        if stop is None:
            self._publish(job, make, Encoding(weights), **where)
        else:
            after = reference_stop(job, stop) if job.ring_gate is not None else None
            if after is not None:
                # The site after next judges the next site's hop against what that site was
                # sent; the reference goes first, to be there before the next token.
                self._publish(
                    job,
                    ModelEnvelope,
                    Encoding(weights),
                    recipient=after.recipient,
                    round=after.round,
                    hop=after.hop,
                    task=Task.REFERENCE,
                )
            self._send_token(job, stop, weights, basis=basis)
        log.info(
            "site %s: %s round %d hop %d trained and sent", self.name, job.algorithm, round, hop
        )
        self.emit(
            "sent",
            job_id=job.job_id,
            algorithm=job.algorithm,
            to=str(where.get("recipient", AGGREGATOR)),
            round=round,
            hop=hop,
            seconds=round_to_ms(time.monotonic() - started),
            facts=self.outbox.traffic.moved_since(published),
        )
