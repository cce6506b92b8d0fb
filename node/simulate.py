"""``fedrelay simulate``: a whole federation in one process, on the embedded transport.

Every site gets its own generated brain-tumour phantom data (heterogeneous scanners, lesion
sizes and case counts), its own node and its own broker connection; the aggregator and a
monitor get theirs. They exchange real messages through the in-memory broker, exactly the
envelopes a RabbitMQ deployment carries, so what works here works there.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from node.algo import SiteAlgo
from node.baselines import centralized, local_only
from node.data import cases_from
from node.models import initial_weights
from node.options import SimulationConfig
from node.phantom import SiteProfile, federation_site
from node.results import MODEL_FILE, ROSTER_FILE, save_model
from node.site import SiteNode
from node.trainer import SegmentationTrainer, trainer_factory
from relay.codec import StateDict
from relay.endpoint import Endpoint
from relay.envelope import AGGREGATOR, EVENTS, Envelope
from relay.errors import JobFailed
from relay.jobspec import (
    Algorithm,
    JobSpec,
)
from relay.monitor import MetricsEvent, Monitor
from relay.runner import run_until
from relay.security import Security, generate
from relay.topology import Topology
from relay.transport import Transport
from relay.transport.memory import MemoryBroker, MemoryTransport
from relay.workflows.coordinator import Coordinator
from relay.workflows.state import GateRefusal, JobState, Status

RESULTS_FILE = "results.json"


class SiteData(BaseModel):
    """One site's data set: its cases and, for a simulated site, its phantom's scanner and
    lesion knobs (None for a deployed site's own data, see :mod:`node.jobreport`)."""

    train_cases: int
    validation_cases: int
    contrast: float | None = None
    bias: float | None = None
    noise: float | None = None
    lesion_scale: float | None = None


class MetricsRow(BaseModel):
    """One measurement a site published while the job ran."""

    site: str
    stage: str
    round: int
    hop: int
    metrics: dict[str, float]


class RoundRow(BaseModel):
    """One round closed by the aggregator (FedAvg rounds; the ensemble's fan-in)."""

    round: int
    contributors: dict[str, int]
    missing: list[str]
    closed_by: str
    seconds: float
    clipped: dict[str, float] = Field(default_factory=dict)
    """Sites whose update was clipped to ``max_update_norm``, with its norm before."""


class TrafficSummary(BaseModel):
    """Bytes and messages published, over all parties, by message kind."""

    total_bytes: int
    bytes_by_kind: dict[str, int]
    messages_by_kind: dict[str, int]


class BaselineSummary(BaseModel):
    """A reference run on the same data (see :mod:`node.baselines`)."""

    final: dict[str, dict[str, float]]
    final_overall: dict[str, float]
    overall_by_round: list[dict[str, float]]
    best_single: str | None = None
    """Local only: the site whose own model scores best over all sites' cases."""
    best_single_overall: dict[str, float] | None = None
    wall_time_s: float = 0.0
    """Seconds it took to train and score (part of the simulation's ``wall_time_s``)."""


class PrivacySpent(BaseModel):
    """What a site reported it spent under differential privacy, by the job's end."""

    epsilon: float
    delta: float


class SimulationResult(BaseModel):
    """Everything ``results.json`` holds."""

    status: str
    reason: str
    job: JobSpec
    data: dict[str, SiteData]
    initial: dict[str, dict[str, float]]
    final: dict[str, dict[str, float]]
    initial_overall: dict[str, float]
    final_overall: dict[str, float]
    history: list[MetricsRow]
    rounds: list[RoundRow]
    late: list[str]
    refused_hops: list[GateRefusal] = Field(default_factory=list)
    """Ring hops a site's validation gate refused (see ``ring_gate``)."""
    dead_letters: list[str]
    bytes_moved: TrafficSummary
    wall_time_s: float
    model_file: str | None
    model_sha256: str | None
    members: list[str]
    baselines: dict[str, BaselineSummary] = Field(default_factory=dict)
    privacy: dict[str, PrivacySpent] = Field(default_factory=dict)


def weighted_overall(
    per_site: dict[str, dict[str, float]], counts: dict[str, int]
) -> dict[str, float]:
    """Each metric averaged over the sites that report it, weighted by their validation cases
    (a distance such as HD95 is undefined at a site where no case had the region)."""
    keys = sorted({k for metrics in per_site.values() for k in metrics})
    overall = {}
    for key in keys:
        sites = [s for s in per_site if key in per_site[s] and counts[s] > 0]
        if sites:
            total = sum(counts[s] for s in sites)
            overall[key] = sum(per_site[s][key] * counts[s] for s in sites) / total
    return overall


def _site_data(
    config: SimulationConfig,
) -> list[tuple[str, SiteProfile, torch.Tensor, torch.Tensor]]:
    return [
        (
            name,
            *federation_site(
                seed=config.seed,
                index=i,
                sites=config.sites,
                cases_per_site=config.cases_per_site,
                split=config.case_split,
                heterogeneity=config.heterogeneity,
                size=config.volume_size,
            ),
        )
        for i, name in enumerate(config.site_names())
    ]


@dataclass
class Federation:
    """An in-process federation: one broker, the aggregator, the sites and a monitor."""

    connect: Callable[[str], Transport]
    """Opens a broker connection as a party (a site, the aggregator, events)."""
    topology: Topology
    coordinator: Coordinator
    sites: list[SiteNode]
    monitor: Monitor
    data: dict[str, SiteData]
    baselines: dict[str, SiteAlgo]
    """Per site, a trainer for the simulated job, to score models outside the federation."""
    security: dict[str, Security]
    """Each party's keys and the roster: every envelope is signed."""

    @classmethod
    def build(
        cls,
        config: SimulationConfig,
        spool: Path,
        *,
        on_event: Callable[[Envelope], None] | None = None,
        connect: Callable[[str], Transport] | None = None,
    ) -> Federation:
        """Generate every site's data and connect every party to the broker ``connect``
        reaches (by default, a fresh in-memory one)."""
        job = config.job()
        topology = Topology(job.federation, job.sites)
        if connect is None:
            broker = MemoryBroker()

            def connect(user: str) -> Transport:
                return MemoryTransport(broker, user=user)

        # Every party signs, as in a provisioned federation: the simulation exercises it too.
        roster, identities = generate(
            job.federation, [AGGREGATOR, *job.sites], encrypt_payloads=config.encrypt_payloads
        )
        security = {name: Security(identity, roster) for name, identity in identities.items()}
        coordinator = Coordinator(
            transport=connect(AGGREGATOR),
            topology=topology,
            spool=spool / AGGREGATOR,
            security=security[AGGREGATOR],
        )
        coordinator.transport.declare(topology)
        monitor = Monitor(
            transport=connect(EVENTS),
            topology=topology,
            spool=spool / EVENTS,
            on_event=on_event,
        )
        sites: list[SiteNode] = []
        data: dict[str, SiteData] = {}
        baselines: dict[str, SiteAlgo] = {}
        for name, profile, images, labels in _site_data(config):
            factory = trainer_factory(cases_from(images, labels, prefix=name), seed=config.seed)
            algo = baselines[name] = factory(job)
            sites.append(
                SiteNode(
                    name=name,
                    algo_factory=factory,
                    transport=connect(name),
                    topology=topology,
                    spool=spool / name,
                    security=security[name],
                )
            )
            data[name] = SiteData(
                train_cases=algo.train_count,
                validation_cases=algo.validation_count,
                contrast=profile.contrast,
                bias=profile.bias,
                noise=profile.noise,
                lesion_scale=profile.lesion_scale,
            )
        return cls(connect, topology, coordinator, sites, monitor, data, baselines, security)

    @property
    def endpoints(self) -> list[Endpoint]:
        """Every party, in the order the loop serves them."""
        return [self.coordinator, *self.sites, self.monitor]

    def run(
        self,
        job: JobSpec,
        *,
        initial: StateDict | None = None,
        absent: frozenset[str] = frozenset(),
    ) -> JobState:
        """Submit ``job`` and serve every party but the ``absent`` sites until it ends."""
        if initial is None:
            initial = initial_weights(job.model, seed=job.seed)
        state = self.coordinator.submit(job, initial)
        present = [e for e in self.endpoints if e.name not in absent]
        try:
            run_until(present, lambda: state.finished)
            # The last events, published as the job finished; on a real broker they may still
            # be on their way, hence the wait.
            while self.monitor.poll(timeout=0.2):
                pass
        except JobFailed as e:
            state.status, state.reason = Status.FAILED, str(e)
        return state

    def close(self) -> None:
        """Close every connection."""
        for endpoint in self.endpoints:
            endpoint.close()


def simulate(
    config: SimulationConfig,
    output: Path,
    *,
    on_event: Callable[[Envelope], None] | None = None,
) -> SimulationResult:
    """Run one job on an in-process federation; write results.json and the final model."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    (output / MODEL_FILE).unlink(missing_ok=True)  # never leave an earlier run's model behind
    job = config.job()
    with tempfile.TemporaryDirectory(prefix="fedrelay-sim-") as scratch:
        federation = Federation.build(config, Path(scratch), on_event=on_event)
        initial = initial_weights(job.model, seed=job.seed)
        initial_scores = {
            name: algo.evaluate([initial]).as_dict() for name, algo in federation.baselines.items()
        }
        try:
            state = federation.run(job, initial=initial)
        finally:
            federation.close()
        baselines = _baselines(federation, job, initial) if config.baselines else {}
    return _write_results(
        output=output,
        federation=federation,
        state=state,
        initial_scores=initial_scores,
        started=started,
        baselines=baselines,
    )


def _baselines(
    federation: Federation, job: JobSpec, initial: StateDict
) -> dict[str, BaselineSummary]:
    trainers = {n: a for n, a in federation.baselines.items() if isinstance(a, SegmentationTrainer)}
    counts = {name: d.validation_cases for name, d in federation.data.items()}
    summaries = {}
    for train in (centralized, local_only):
        began = time.perf_counter()
        run = train(trainers, job, initial)
        summary = BaselineSummary(
            final=run.final,
            final_overall=weighted_overall(run.final, counts),
            overall_by_round=[weighted_overall(scores, counts) for scores in run.history],
            wall_time_s=round(time.perf_counter() - began, 3),
        )
        if run.cross:
            overall = {site: weighted_overall(s, counts) for site, s in run.cross.items()}
            best = max(overall, key=lambda site: overall[site].get("dice_mean", 0.0))
            summary.best_single, summary.best_single_overall = best, overall[best]
        summaries[run.method] = summary
    return summaries


def _write_results(
    *,
    output: Path,
    federation: Federation,
    state: JobState,
    initial_scores: dict[str, dict[str, float]],
    started: float,
    baselines: dict[str, BaselineSummary],
) -> SimulationResult:
    job = state.spec
    data = federation.data
    counts = {name: d.validation_cases for name, d in data.items()}
    model_file, model_digest = (
        save_model(state, output) if state.status is Status.DONE else (None, None)
    )
    # The run's keys are gone with it; its roster stays, to verify the model's lineage.
    federation.security[AGGREGATOR].roster.save(output / ROSTER_FILE)
    endpoints = federation.endpoints
    traffic = [e.outbox.traffic for e in endpoints]
    result = SimulationResult(
        status=str(state.status),
        reason=state.reason,
        job=job,
        data=data,
        initial=initial_scores,
        final=state.final_metrics,
        initial_overall=weighted_overall(initial_scores, counts),
        final_overall=weighted_overall(state.final_metrics, counts),
        history=[
            MetricsRow(site=m.site, stage=m.stage, round=m.round, hop=m.hop, metrics=m.metrics)
            for m in federation.monitor.metrics
        ],
        rounds=[RoundRow(**vars(r)) for r in state.rounds],
        late=state.late,
        refused_hops=state.refused,
        dead_letters=[reason for e in endpoints for reason in e.rejected],
        bytes_moved=TrafficSummary(
            total_bytes=sum(t.total_bytes for t in traffic),
            bytes_by_kind=_sum_counters([dict(t.bytes) for t in traffic]),
            messages_by_kind=_sum_counters([dict(t.messages) for t in traffic]),
        ),
        wall_time_s=round(time.perf_counter() - started, 3),
        model_file=model_file,
        model_sha256=model_digest,
        members=state.final_sites if job.algorithm is Algorithm.ENSEMBLE else [],
        baselines=baselines,
        privacy=_privacy_spent(job, federation.monitor.metrics),
    )
    (output / RESULTS_FILE).write_text(result.model_dump_json(indent=2) + "\n")
    return result


def _privacy_spent(job: JobSpec, metrics: Sequence[MetricsEvent]) -> dict[str, PrivacySpent]:
    """Each site's ε as it last reported it (its last model sent), at the job's δ."""
    if job.privacy is None:
        return {}
    spent = {m.site: m.metrics["epsilon"] for m in metrics if "epsilon" in m.metrics}
    return {site: PrivacySpent(epsilon=e, delta=job.privacy.delta) for site, e in spent.items()}


def _sum_counters(counters: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))
