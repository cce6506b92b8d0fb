"""Operating a running federation: submitting jobs, following them, and its status."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from node.config import FederationConfig
from relay.codec import StateDict, encode
from relay.envelope import AGGREGATOR, ControlEnvelope, JobSpecEnvelope, ModelEnvelope
from relay.errors import FedrelayError, InvalidInput, JobFailed, TransportError
from relay.frame import decode_frame
from relay.jobspec import JobSpec
from relay.messaging import Outbox
from relay.topology import Topology, dead_letter_reason
from relay.transport import Transport


def submit_job(transport: Transport, topology: Topology, spec: JobSpec, initial: StateDict) -> None:
    """Send a job spec, then its initial model, to the aggregator (as the aggregator)."""
    outbox = Outbox(transport, topology, sender=AGGREGATOR)
    common: dict[str, Any] = {
        "job_id": spec.job_id,
        "algorithm": spec.algorithm,
        "recipient": AGGREGATOR,
    }
    outbox.send(
        JobSpecEnvelope, spec.model_dump_json().encode(), chunk_size=spec.chunk_size, **common
    )
    outbox.send(ModelEnvelope, encode(initial), chunk_size=spec.chunk_size, **common)


def wait_for_job(
    transport: Transport, topology: Topology, job_id: str, *, timeout_s: float = 7 * 24 * 3600
) -> ControlEnvelope:
    """Follow the events queue until job ``job_id`` is done or failed; return that event.

    It consumes the events it reads (the events queue is for one watcher at a time).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        delivery = transport.get(topology.events_queue, timeout=1.0)
        if delivery is None:
            continue
        transport.ack(delivery)
        try:
            envelope, _ = decode_frame(delivery.message.body)
        except InvalidInput:
            continue
        if isinstance(envelope, ControlEnvelope) and envelope.job_id == job_id:
            return envelope
    raise JobFailed(f"job {job_id} did not end within {timeout_s:g} s")


def _api(config: FederationConfig, path: str, *, user: str, password: str, body: Any = None) -> Any:
    url = f"{config.broker.management_url.rstrip('/')}/api/{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raise TransportError(
            f"management API {url}: HTTP {e.code} {e.reason}; check broker.management_url, "
            "the user (it needs the monitoring tag) and the vhost"
        ) from e
    except urllib.error.URLError as e:
        raise TransportError(
            f"management API {url} is unreachable ({e.reason}); is rabbitmq_management on?"
        ) from e


def federation_status(config: FederationConfig, *, user: str, password: str) -> dict[str, Any]:
    """Queues (ready, unacked, consumers), dead letters and the latest event, as plain data."""
    topology = Topology(config.federation, tuple(config.sites))
    vhost = urllib.parse.quote(config.broker.vhost, safe="")
    queues = []
    for name in topology.queues():
        try:
            info = _api(
                config,
                f"queues/{vhost}/{urllib.parse.quote(name, safe='')}",
                user=user,
                password=password,
            )
        except TransportError as e:
            if "HTTP 404" not in str(e):
                raise
            info = None
        queues.append(
            {
                "name": name,
                "declared": info is not None,
                "ready": (info or {}).get("messages_ready", 0),
                "unacked": (info or {}).get("messages_unacknowledged", 0),
                "consumers": (info or {}).get("consumers", 0),
            }
        )
    dead = next(q for q in queues if q["name"] == topology.dead_queue)
    events = next(q for q in queues if q["name"] == topology.events_queue)
    return {
        "federation": config.federation,
        "vhost": config.broker.vhost,
        "queues": queues,
        # A site's consumer is attached while it waits for work and detached while it
        # trains (so that nothing waits unacked for hours): listening = idle and reachable.
        "sites_listening": [
            site
            for site in topology.sites
            if next(q for q in queues if q["name"] == topology.site_queue(site))["consumers"]
        ],
        "dead_letters": dead["ready"],
        "dead_letter_reasons": _peek_reasons(
            config, topology, vhost, dead["ready"], user=user, password=password
        ),
        "last_event": _last_event(
            config, topology, vhost, events["ready"], user=user, password=password
        ),
    }


def _peek(
    config: FederationConfig, vhost: str, queue: str, count: int, *, user: str, password: str
) -> list[dict[str, Any]]:
    if count == 0:
        return []
    body = {"count": count, "ackmode": "ack_requeue_true", "encoding": "base64", "truncate": 1}
    result: list[dict[str, Any]] = _api(
        config,
        f"queues/{vhost}/{urllib.parse.quote(queue, safe='')}/get",
        user=user,
        password=password,
        body=body,
    )
    return result


def _peek_reasons(
    config: FederationConfig,
    topology: Topology,
    vhost: str,
    count: int,
    *,
    user: str,
    password: str,
) -> list[str]:
    messages = _peek(
        config, vhost, topology.dead_queue, min(count, 20), user=user, password=password
    )
    return [dead_letter_reason(m["properties"].get("headers", {})) for m in messages]


def _last_event(
    config: FederationConfig,
    topology: Topology,
    vhost: str,
    count: int,
    *,
    user: str,
    password: str,
) -> dict[str, Any] | None:
    try:
        messages = _peek(
            config, vhost, topology.events_queue, min(count, 5000), user=user, password=password
        )
    except FedrelayError:
        return None
    if not messages:
        return None
    last = messages[-1]["properties"]
    headers = last.get("headers", {})
    return {
        "type": last.get("type"),
        "job": headers.get("job"),
        "round": headers.get("round"),
        "hop": headers.get("hop"),
        "sender": headers.get("sender"),
    }
