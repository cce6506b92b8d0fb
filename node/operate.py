"""Operating a running federation: submitting jobs, following them, and its status."""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from node.config import FederationConfig
from relay.codec import Encoding, StateDict
from relay.envelope import (
    AGGREGATOR,
    Command,
    ControlEnvelope,
    EventEnvelope,
    JobSpecEnvelope,
    ModelEnvelope,
    to_wire,
)
from relay.errors import InvalidInput, JobFailed, TransportError
from relay.frame import decode_frame
from relay.jobspec import MAX_CHUNK_SIZE, Algorithm, JobSpec
from relay.messaging import Outbox
from relay.security import Security
from relay.topology import Topology
from relay.transport import Transport


def submit_job(
    transport: Transport,
    topology: Topology,
    spec: JobSpec,
    initial: StateDict,
    *,
    security: Security | None = None,
) -> None:
    """Send a job spec, then its initial model, to the aggregator (as the aggregator, signed
    with its key where the federation is provisioned)."""
    outbox = Outbox(transport, topology, sender=AGGREGATOR, security=security)
    common: dict[str, Any] = {
        "job_id": spec.job_id,
        "algorithm": spec.algorithm,
        "recipient": AGGREGATOR,
    }
    outbox.send(
        JobSpecEnvelope, spec.model_dump_json().encode(), chunk_size=spec.chunk_size, **common
    )
    outbox.send(ModelEnvelope, Encoding(initial), chunk_size=spec.chunk_size, **common)


def send_command(
    transport: Transport,
    topology: Topology,
    job_id: str,
    command: Command,
    *,
    reason: str = "",
    security: Security | None = None,
) -> str:
    """Ask the aggregator to cancel or resume job ``job_id`` (as the aggregator's user, signed
    with its key where the federation is provisioned); returns the request's message id. The
    aggregator refuses, into the dead letters with the reason, a job it does not know or one
    in the wrong state for it."""
    sent = Outbox(transport, topology, sender=AGGREGATOR, security=security).send(
        ControlEnvelope,
        chunk_size=MAX_CHUNK_SIZE,
        job_id=job_id,
        algorithm=Algorithm.FEDAVG,  # the aggregator goes by the job's own
        recipient=AGGREGATOR,
        command=command,
        reason=reason,
    )
    return sent.message_id


def wait_for_job(
    transport: Transport,
    topology: Topology,
    job_id: str,
    *,
    timeout_s: float = 7 * 24 * 3600,
    security: Security | None = None,
    request: str | None = None,
) -> ControlEnvelope:
    """Follow the events queue until job ``job_id`` is done or failed; return that event.

    Only the aggregator ends a job: an end event from anyone else (any site may publish
    events), or, with ``security``, one not signed by the aggregator, is ignored. With
    ``request`` (a resume's message id), end events before the aggregator announced that it
    resumed the job are the stopped job's and are skipped; its refusal of the request ends
    the wait with JobFailed. It consumes
    the events it reads (the events queue is for one watcher at a time).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        delivery = transport.get(topology.events_queue, timeout=1.0)
        if delivery is None:
            continue
        transport.ack(delivery)
        try:
            envelope, _ = decode_frame(delivery.message.body)
            if envelope.sender != AGGREGATOR or delivery.message.user_id != AGGREGATOR:
                continue
            if security is not None:
                security.verify(to_wire(envelope), envelope.sender)
        except InvalidInput:
            continue
        if envelope.job_id != job_id:
            continue
        if request is not None and isinstance(envelope, EventEnvelope):
            if envelope.detail.get("request") == request and envelope.event == "job_resumed":
                request = None  # the end events from here on are the resumed job's
            elif envelope.detail.get("message_id") == request and envelope.event == "rejected":
                raise JobFailed(f"the aggregator refused the request: {envelope.detail['reason']}")
        elif request is None and isinstance(envelope, ControlEnvelope):
            return envelope
    raise JobFailed(f"job {job_id} did not end within {timeout_s:g} s")


class ManagementApi:
    """RabbitMQ's management HTTP API, as one user."""

    def __init__(self, url: str, *, user: str, password: str) -> None:
        self.url = url.rstrip("/")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._authorization = f"Basic {token}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; TransportError says what failed and what to check."""
        url = f"{self.url}/api/{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", self._authorization)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raise TransportError(
                f"management API {method} {url}: HTTP {e.code} {e.reason} "
                f"({e.read()[:300]!r}); check the URL, the user (it needs the monitoring tag) "
                "and the vhost"
            ) from e
        except urllib.error.URLError as e:
            raise TransportError(
                f"management API {url} is unreachable ({e.reason}); is rabbitmq_management on?"
            ) from e
        except (http.client.HTTPException, OSError) as e:
            raise TransportError(
                f"management API {url} did not answer HTTP ({type(e).__name__}: {e}); check "
                "broker.management_url: http:// or https://, and the port (15672, or 15671 "
                "with TLS)"
            ) from e

    def peek(self, vhost: str, queue: str, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` messages from the head of ``queue``, requeued (bodies truncated)."""
        if count == 0:
            return []
        body = {"count": count, "ackmode": "ack_requeue_true", "encoding": "base64", "truncate": 1}
        path = f"queues/{quote(vhost)}/{quote(queue)}/get"
        result: list[dict[str, Any]] = self.call("POST", path, body)
        return result


def quote(name: str) -> str:
    """A vhost or queue name as one URL path segment."""
    return urllib.parse.quote(name, safe="")


def federation_status(config: FederationConfig, *, user: str, password: str) -> dict[str, Any]:
    """Queues (ready, unacked, consumers), the sites listening and the number of dead letters,
    as plain data. Dead letters are counted, not read: reading a quorum queue's messages puts
    them back at its end (``fedrelay dead list`` reads them all and restores the order)."""
    api = ManagementApi(config.broker.management_url, user=user, password=password)
    topology = config.topology()
    vhost = config.broker.vhost
    declared = {q["name"]: q for q in api.call("GET", f"queues/{quote(vhost)}")}
    queues = [
        {
            "name": name,
            "declared": name in declared,
            "ready": declared.get(name, {}).get("messages_ready", 0),
            "unacked": declared.get(name, {}).get("messages_unacknowledged", 0),
            "consumers": declared.get(name, {}).get("consumers", 0),
        }
        for name in topology.queues()
    ]
    by_name = {q["name"]: q for q in queues}
    return {
        "federation": config.federation,
        "vhost": vhost,
        "queues": queues,
        # A site's consumer is attached while it waits for work and detached while it
        # trains (so that nothing waits unacked for hours): listening = idle and reachable.
        "sites_listening": [
            site for site in topology.sites if by_name[topology.site_queue(site)]["consumers"]
        ],
        "dead_letters": by_name[topology.dead_queue]["ready"],
    }
