"""A monitor: follows a federation's events queue and keeps the history of a job.

Sites publish metrics events (``events.metrics``) for every model they receive and train;
the aggregator publishes job life-cycle events (``events.control``). The simulation uses a
monitor for its per-round metrics and progress display.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.endpoint import Action, Endpoint
from relay.envelope import EVENTS, ControlEnvelope, Envelope, MetricsEnvelope
from relay.messaging import Received
from relay.topology import Topology
from relay.transport import Transport


@dataclass(frozen=True)
class MetricsEvent:
    """One site's measurement of a model it received or trained."""

    job_id: str
    site: str
    stage: str
    round: int
    hop: int
    sample_count: int
    metrics: dict[str, float]

    @classmethod
    def of(cls, envelope: MetricsEnvelope) -> MetricsEvent:
        """The measurement a metrics envelope carries."""
        return cls(
            envelope.job_id,
            envelope.sender,
            envelope.stage,
            envelope.round,
            envelope.hop,
            envelope.sample_count,
            dict(envelope.metrics),
        )


class Monitor(Endpoint):
    """Consumes the events queue; calls ``on_event`` for each event as it arrives."""

    def __init__(
        self,
        *,
        transport: Transport,
        topology: Topology,
        spool: Path,
        on_event: Callable[[Envelope], None] | None = None,
    ) -> None:
        super().__init__(
            name=EVENTS,
            transport=transport,
            topology=topology,
            spool=spool,
            queue=topology.events_queue,
        )
        self.metrics: list[MetricsEvent] = []
        self.control: list[ControlEnvelope] = []
        self.on_event = on_event

    def emit(self, event: str, **_: object) -> None:
        """A monitor publishes no events: it would read its own."""

    def prepare(self, received: Received) -> Action | None:
        """Record metrics and control events (after the ack); others are only passed on."""
        return lambda: self._record(received.envelope)

    def _record(self, envelope: Envelope) -> None:
        if isinstance(envelope, MetricsEnvelope):
            self.metrics.append(MetricsEvent.of(envelope))
        elif isinstance(envelope, ControlEnvelope):
            self.control.append(envelope)
        if self.on_event is not None:
            self.on_event(envelope)
