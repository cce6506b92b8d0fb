"""A site: receives models, trains them on its own data, sends them on. Images never leave.

Per message: verify → ack → evaluate the received model → train → publish the result (to
the aggregator for FedAvg and ensembles; to the next site of the ring for SWT and CWT). Every
model it receives and trains is measured on the site's validation split and published as a
metrics event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from node.models import initial_weights
from node.trainer import SiteAlgo
from relay.aggregation import check_compatible, unbundle
from relay.codec import StateDict, decode, encode
from relay.endpoint import Action, Endpoint
from relay.envelope import (
    AGGREGATOR,
    EVENTS,
    Command,
    ControlEnvelope,
    EnsembleMemberEnvelope,
    EnvelopeBase,
    JobSpecEnvelope,
    MetricsEnvelope,
    ModelEnvelope,
    Task,
    UpdateEnvelope,
)
from relay.errors import EnvelopeError
from relay.jobspec import Algorithm, JobSpec
from relay.messaging import Received
from relay.topology import Topology
from relay.transport import Transport
from relay.validation import parse_json
from relay.workflows.ring import expected_hop, next_stop

log = logging.getLogger(__name__)


class SiteNode(Endpoint):
    """One hospital's node: a transport connection, a training algorithm, and its jobs."""

    def __init__(
        self,
        *,
        name: str,
        algo: SiteAlgo,
        transport: Transport,
        topology: Topology,
        spool: Path,
    ) -> None:
        super().__init__(name=name, transport=transport, topology=topology, spool=spool)
        self.algo = algo
        self.jobs: dict[str, JobSpec] = {}
        self._references: dict[str, StateDict] = {}

    def prepare(self, received: Received) -> Action | None:
        """Accept job specs, models to train or evaluate, and cancellations."""
        envelope = received.envelope
        if envelope.sender != AGGREGATOR and not isinstance(envelope, ModelEnvelope):
            raise EnvelopeError(
                f"envelope.sender: only the aggregator may send {envelope.kind} to a site, "
                f"got {envelope.sender!r}"
            )
        if isinstance(envelope, JobSpecEnvelope):
            spec = parse_json(JobSpec, bytes(received.payload), what="job")
            self._check_spec(spec, envelope.job_id)
            return lambda: self._add_job(spec)
        job = self.jobs.get(envelope.job_id)
        if job is None:
            raise EnvelopeError(
                f"envelope.job_id: {envelope.job_id!r} is unknown to site {self.name!r}; the "
                "job spec must arrive first (was it submitted to this federation?)"
            )
        if isinstance(envelope, ControlEnvelope) and envelope.command is Command.CANCEL:
            return lambda: self._forget(job.job_id)
        if not isinstance(envelope, ModelEnvelope):
            raise EnvelopeError(f"envelope.kind: a site does not accept {envelope.kind}")
        if job.algorithm.is_ring and envelope.task is Task.TRAIN:
            expected_hop(job, self.name, round=envelope.round, hop=envelope.hop)
            if envelope.hop > 0 and envelope.sender != job.sites[envelope.hop - 1]:
                raise EnvelopeError(
                    f"envelope.sender: hop {envelope.hop} must come from "
                    f"{job.sites[envelope.hop - 1]!r}, got {envelope.sender!r}"
                )
        elif envelope.sender != AGGREGATOR:
            raise EnvelopeError(
                f"envelope.sender: {job.algorithm} models come from the aggregator, "
                f"got {envelope.sender!r}"
            )
        members = unbundle(decode(received.payload), envelope.members)
        reference = self._reference(job)
        for i, member in enumerate(members):
            check_compatible(reference, member, who=f"model from {envelope.sender!r} member {i}")
        if envelope.task is Task.EVALUATE:
            return lambda: self._evaluate_final(job, envelope, members)
        if envelope.members != 1:
            raise EnvelopeError("envelope.members: a model to train must be a single model")
        return lambda: self._train(job, envelope, members[0])

    def _check_spec(self, spec: JobSpec, job_id: str) -> None:
        if spec.job_id != job_id:
            raise EnvelopeError(f"job.job_id {spec.job_id!r} differs from envelope's {job_id!r}")
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

    def _add_job(self, spec: JobSpec) -> None:
        self.jobs[spec.job_id] = spec

    def _forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._references.pop(job_id, None)

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
        self.outbox.send(
            MetricsEnvelope,
            chunk_size=job.chunk_size,
            job_id=job.job_id,
            algorithm=job.algorithm,
            recipient=recipient,
            round=round,
            hop=hop,
            stage=stage,
            sample_count=self.algo.validation_count,
            metrics=metrics,
        )

    def _evaluate_final(
        self, job: JobSpec, envelope: ModelEnvelope, members: list[StateDict]
    ) -> None:
        dice = self.algo.evaluate(members)
        # The final evaluation is the last thing a job asks of a site.
        self.algo.finalize(job.job_id)
        self._forget(job.job_id)
        self._metrics(
            job,
            "final",
            dice.as_dict(),
            round=envelope.round,
            hop=envelope.hop,
            recipient=AGGREGATOR,
        )

    def _train(self, job: JobSpec, envelope: ModelEnvelope, weights: StateDict) -> None:
        round, hop = envelope.round, envelope.hop
        self._metrics(
            job, "received", self.algo.evaluate([weights]).as_dict(), round=round, hop=hop
        )
        passes = job.rounds if job.algorithm is Algorithm.ENSEMBLE else 1
        for step in range(passes):
            at = step if job.algorithm is Algorithm.ENSEMBLE else round
            result = self.algo.train(
                weights, epochs=job.training.local_epochs, job_id=job.job_id, round=at
            )
            weights = result.weights
            trained = self.algo.evaluate([weights]).as_dict() | {"loss": result.loss}
            self._metrics(job, "trained", trained, round=at, hop=hop)
        make: Callable[..., EnvelopeBase]
        if job.algorithm is Algorithm.FEDAVG:
            make = UpdateEnvelope
            where: dict[str, object] = {"recipient": AGGREGATOR, "round": round}
        elif job.algorithm is Algorithm.ENSEMBLE:
            make = EnsembleMemberEnvelope
            where = {"recipient": AGGREGATOR}
        else:
            stop = next_stop(job, self.name, round=round)
            make = ModelEnvelope
            where = {"recipient": stop.recipient, "round": stop.round, "hop": stop.hop}
        if not job.algorithm.is_ring:
            where |= {"sample_count": result.sample_count, "metrics": trained}
        self.outbox.send(
            make,
            encode(weights),
            chunk_size=job.chunk_size,
            job_id=job.job_id,
            algorithm=job.algorithm,
            **where,
        )
        log.info(
            "site %s: %s round %d hop %d trained and sent", self.name, job.algorithm, round, hop
        )
