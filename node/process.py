"""Long-running processes: a site node and the aggregator, each its own OS process.

Each process connects to RabbitMQ as its own broker user, resumes whatever its journal holds,
then serves its queue until SIGTERM or SIGINT, finishing the message in hand before it stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from node.algo import AlgoFactory, custom_factory
from node.config import FederationConfig, FolderData, Site
from node.data import Case, cases_from, read_cases
from node.phantom import federation_site
from node.results import write_job
from node.site import SiteNode
from node.sitefacts import describer
from node.systemd import notify
from node.testfreeze import transport as node_transport
from node.trainer import trainer_factory
from relay.endpoint import Endpoint
from relay.envelope import AGGREGATOR
from relay.errors import FedrelayError
from relay.workflows.coordinator import Coordinator
from relay.workflows.state import JobState

log = logging.getLogger(__name__)

POLL_S = 1.0
"""How long one wait for a message lasts; deadlines and stop requests are checked between."""


def site_cases(section: Site, name: str) -> list[Case]:
    """The cases of a site with [data]: its folder's, read and checked, or its phantom's."""
    data = section.data
    if isinstance(data, FolderData):
        cases = read_cases(data.kind, data.path, limit=data.limit)
        log.info("site %s: %d %s cases read from %s", name, len(cases), data.kind, data.path)
        return cases
    assert data is not None  # the configuration holds data or a trainer
    _, images, labels = federation_site(
        seed=data.seed,
        index=data.index,
        sites=data.of,
        cases_per_site=data.cases_per_site,
        split=data.case_split,
        heterogeneity=data.heterogeneity,
        size=data.volume_size,
    )
    return cases_from(images, labels, prefix=name)


def site_trainers(section: Site, name: str, cases: list[Case] | None = None) -> AlgoFactory:
    """The site's trainers: its own factory, or fedrelay's on its cases (read unless given)."""
    if section.trainer is not None:
        key = f"sites.{name}.trainer.factory"
        return custom_factory(section.trainer.factory, section.trainer.options, key=key)
    assert section.data is not None  # the configuration holds data or a trainer
    cases = site_cases(section, name) if cases is None else cases
    return trainer_factory(cases, seed=section.data.seed)


def site_node(config: FederationConfig, name: str) -> SiteNode:
    """Site ``name``'s node, connected, with its data loaded."""
    section = config.site(name)
    transport = node_transport(config.broker_settings(name, section.password))
    cases = None if section.data is None else site_cases(section, name)
    return SiteNode(
        name=name,
        algo_factory=site_trainers(section, name, cases),
        describe=describer(config, name, cases),
        transport=transport,
        topology=config.topology(),
        spool=section.spool,
        security=config.party_security(name),
    )


def aggregator(config: FederationConfig) -> Coordinator:
    """The aggregator, connected; finished jobs are written under its ``output`` folder."""
    section = config.aggregator_section()
    output = section.output

    def finished(job: JobState) -> None:
        folder = write_job(job, output)
        log.info("job %s %s; results in %s", job.spec.job_id, job.status, folder)

    transport = node_transport(config.broker_settings(AGGREGATOR, section.password))
    return Coordinator(
        transport=transport,
        topology=config.topology(),
        spool=section.spool,
        on_finish=finished,
        security=config.party_security(AGGREGATOR),
    )


def serve(endpoint: Endpoint, stop: threading.Event) -> None:
    """Resume the journal, then handle messages until ``stop`` is set. An error (a full
    spool, a broker gone for good) stops it too, after closing the connection, so that a
    message taken and not persisted goes back to its queue at once."""
    try:
        resumed = endpoint.resume()
        if resumed:
            log.warning(
                "%s finished %d message(s) left from before its restart", endpoint.name, resumed
            )
        log.info("%s serving %s", endpoint.name, endpoint.queue)
        notify(f"READY=1\nSTATUS=serving {endpoint.queue}")
        while not stop.is_set():
            if endpoint.poll(timeout=POLL_S):
                continue  # what is queued first: a word that answers a deadline is in it
            with endpoint.journal.writing():
                endpoint.tick(time.time())
    except FedrelayError as e:
        log.critical("%s stops: %s", endpoint.name, e)
        raise
    finally:
        notify("STOPPING=1")
        endpoint.close()


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (systemd's stop, Ctrl-C)."""
    stop = threading.Event()

    def handle(number: int, _frame: FrameType | None) -> None:
        log.warning("signal %d: stopping after the current message", number)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop
