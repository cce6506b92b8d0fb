"""Transport semantics, the same on every transport: routing, refusals, acks, dead letters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from relay.codec import Encoding, decode, digest, encode
from relay.envelope import ModelEnvelope
from relay.errors import AccessRefused, MessageTooLarge, Unroutable
from relay.frame import decode_frame
from relay.messaging import Inbox, Outbox
from relay.topology import (
    DELIVERY_LIMIT,
    ORIGINAL_USER_HEADER,
    Topology,
    dead_letter_reason,
    topic_matches,
)
from relay.transport import Delivery, Message, Transport
from tests.conftest import Connect


def message(user: str | None, body: bytes = b"hello", message_id: str = "m1") -> Message:
    return Message(
        body=body,
        type="model",
        message_id=message_id,
        correlation_id="job",
        user_id=user,
        headers={"round": 1},
    )


def delivered_to_site_1(connect: Connect, topology: Topology) -> tuple[Transport, Delivery]:
    """The aggregator sends site-1 a message; site-1 takes it and has not settled it yet."""
    aggregator = connect("aggregator")
    aggregator.declare(topology)
    aggregator.publish("site.site-1", message("aggregator"), exchange=topology.exchange)
    site = connect("site-1")
    delivery = site.get(topology.site_queue("site-1"), timeout=1)
    assert delivery is not None
    return site, delivery


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("site.a", "site.a", True),
        ("site.*", "site.a", True),
        ("site.*", "site.a.b", False),
        ("events.#", "events", True),
        ("events.#", "events.metrics.x", True),
        ("#", "anything.at.all", True),
        ("site.a", "site.b", False),
    ],
)
def test_topic_matching_follows_rabbitmq(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_message_reaches_only_the_addressed_site(connect: Connect, topology: Topology) -> None:
    aggregator = connect("aggregator")
    aggregator.declare(topology)
    aggregator.publish("site.site-2", message("aggregator"), exchange=topology.exchange)
    site2, site1 = connect("site-2"), connect("site-1")
    assert site1.get(topology.site_queue("site-1")) is None
    delivery = site2.get(topology.site_queue("site-2"), timeout=1)
    assert delivery is not None
    assert delivery.message.body == b"hello"
    assert delivery.message.headers["round"] == 1
    assert not delivery.redelivered
    site2.ack(delivery)
    assert site2.get(topology.site_queue("site-2")) is None


def test_events_fan_into_the_events_queue(connect: Connect, topology: Topology) -> None:
    site = connect("site-1")
    site.declare(topology)
    site.publish("events.metrics", message("site-1"), exchange=topology.exchange)
    delivery = connect("events").get(topology.events_queue, timeout=1)
    assert delivery is not None and delivery.message.type == "model"


def test_unroutable_publish_is_refused(connect: Connect, topology: Topology) -> None:
    site = connect("site-1")
    site.declare(topology)
    with pytest.raises(Unroutable, match=r"site\.nobody"):
        site.publish("site.nobody", message("site-1"), exchange=topology.exchange)


def test_publishing_as_another_user_is_refused(connect: Connect, topology: Topology) -> None:
    site = connect("site-1")
    site.declare(topology)
    with pytest.raises(AccessRefused, match="site-2"):
        site.publish("aggregator", message("site-2"), exchange=topology.exchange)


def test_oversize_message_is_refused(connect: Connect, topology: Topology) -> None:
    site = connect("site-1")
    site.declare(topology)
    with pytest.raises(MessageTooLarge, match="chunk_size"):
        site.publish(
            "aggregator", message("site-1", bytes(129 * 1024 * 1024)), exchange=topology.exchange
        )


def test_rejected_message_is_dead_lettered_with_its_reason(
    connect: Connect, topology: Topology
) -> None:
    site, delivery = delivered_to_site_1(connect, topology)
    site.reject(delivery, "envelope.round: bad", dead_letter_exchange=topology.dead_letter_exchange)
    dead = connect("operator").get(topology.dead_queue, timeout=1)
    assert dead is not None
    assert dead_letter_reason(dead.message.headers) == "envelope.round: bad"
    assert dead.message.headers[ORIGINAL_USER_HEADER] == "aggregator"
    assert dead.message.body == b"hello"


def test_closing_returns_unacked_messages_marked_redelivered(
    connect: Connect, topology: Topology
) -> None:
    first, _ = delivered_to_site_1(connect, topology)
    first.close()
    again = connect("site-1").get(topology.site_queue("site-1"), timeout=1)
    assert again is not None and again.redelivered


def test_requeued_past_the_delivery_limit_is_dead_lettered(
    connect: Connect, topology: Topology
) -> None:
    aggregator = connect("aggregator")
    aggregator.declare(topology)
    aggregator.publish("site.site-1", message("aggregator"), exchange=topology.exchange)
    site = connect("site-1")
    for _ in range(DELIVERY_LIMIT + 1):
        delivery = site.get(topology.site_queue("site-1"), timeout=1)
        assert delivery is not None
        site.requeue(delivery)
    assert site.get(topology.site_queue("site-1")) is None
    dead = connect("operator").get(topology.dead_queue, timeout=1)
    assert dead is not None
    assert dead_letter_reason(dead.message.headers) == "broker: delivery_limit"


def test_an_encoding_streams_out_in_chunks_and_arrives_whole(
    connect: Connect, topology: Topology, tmp_path: Path
) -> None:
    sender, receiver = connect("site-1"), connect("site-2")
    sender.declare(topology)
    state = {f"t{i}": torch.randn(1000 + i) for i in range(5)}  # chunks straddle tensors
    last = Outbox(sender, topology, sender="site-1").send(
        ModelEnvelope,
        Encoding(state),
        chunk_size=3000,
        job_id="j",
        algorithm="cwt",
        recipient="site-2",
        hop=1,
    )
    assert last.chunk_count > 5 and last.payload_digest == digest(encode(state))
    inbox, seen, received = Inbox(owner="site-2", spool=tmp_path), [], None
    while received is None:
        delivery = receiver.get(topology.site_queue("site-2"), timeout=5)
        assert delivery is not None, "a chunk went missing"
        seen.append(decode_frame(delivery.message.body)[0].payload_digest)
        received = inbox.receive(delivery)
        receiver.ack(delivery)
    assert seen == [None] * (last.chunk_count - 1) + [last.payload_digest]
    assert received.envelope.digest == last.payload_digest
    out = decode(received.payload)
    assert all(torch.equal(out[name], state[name]) for name in state)
