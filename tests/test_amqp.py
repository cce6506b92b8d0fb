"""What only the real broker can show: heartbeats during training, large models, its limits."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from relay.codec import Encoding, decode, encode
from relay.envelope import ModelEnvelope
from relay.errors import MessageTooLarge, TransportError
from relay.messaging import Inbox, Outbox
from relay.topology import Topology
from relay.transport import Message
from relay.transport.amqp import AmqpTransport, BrokerSettings
from tests.broker import HOST, TestBroker, api, free_port, quote

MiB = 1024 * 1024


@pytest.fixture
def rabbit() -> Iterator[TestBroker]:
    broker = TestBroker(heartbeat_s=1)
    yield broker
    broker.delete()


def train_for(seconds: float) -> None:
    """Real torch work, holding the caller as a training step would."""
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        loss = model(torch.randn(512, 256)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_heartbeats_hold_through_a_training_step_longer_than_three_intervals(
    rabbit: TestBroker,
) -> None:
    topology = Topology("hb", ("site-1",))
    aggregator, site = rabbit.connect("aggregator"), rabbit.connect("site-1")
    aggregator.declare(topology)
    message = Message(
        body=b"token", type="model", message_id="m", correlation_id="j", user_id="aggregator"
    )
    aggregator.publish("site.site-1", message, exchange=topology.exchange)
    delivery = site.get(topology.site_queue("site-1"), timeout=5)
    assert delivery is not None
    site.ack(delivery)
    generation = site._generation
    train_for(4.5)  # heartbeat 1 s: the broker closes a silent connection after ~2 s
    site.publish(
        "aggregator",
        Message(
            body=b"update", type="update", message_id="u", correlation_id="j", user_id="site-1"
        ),
        exchange=topology.exchange,
    )
    assert site._generation == generation, "the connection was lost and rebuilt"
    received = aggregator.get(topology.aggregator_queue, timeout=5)
    assert received is not None and received.message.body == b"update"
    aggregator.close()
    site.close()


def set_max_message_size(size: int) -> None:
    subprocess.run(
        ["rabbitmqctl", "eval", f"application:set_env(rabbit, max_message_size, {size})."],
        check=True,
        capture_output=True,
    )


def test_a_1_gb_model_crosses_a_broker_limited_to_16_mib_messages(
    rabbit: TestBroker, tmp_path: Path
) -> None:
    topology = Topology("big", ("site-1", "site-2"))
    set_max_message_size(16 * MiB)  # read by each channel as it opens
    sender, receiver = rabbit.connect("site-1"), rabbit.connect("site-2")
    sender.declare(topology)
    try:
        with pytest.raises(MessageTooLarge, match="chunk_size"):
            sender.publish(
                "site.site-2",
                Message(
                    body=bytes(17 * MiB),
                    type="model",
                    message_id="x",
                    correlation_id="j",
                    user_id="site-1",
                ),
                exchange=topology.exchange,
            )
        gen = torch.Generator().manual_seed(0)
        state = {f"layer{i}": torch.randn(16 * MiB, generator=gen) for i in range(16)}
        payload = Encoding(state)  # chunks go out while later tensors are still copied in
        assert len(payload.payload) > 1024**3
        Outbox(sender, topology, sender="site-1").send(
            ModelEnvelope,
            payload,
            chunk_size=8 * MiB,
            job_id="big",
            algorithm="cwt",
            recipient="site-2",
            hop=1,
        )
        del payload
        inbox = Inbox(owner="site-2", spool=tmp_path)
        received = None
        while received is None:
            delivery = receiver.get(topology.site_queue("site-2"), timeout=10)
            assert delivery is not None, "a chunk went missing"
            received = inbox.receive(delivery)
            receiver.ack(delivery)
        assert received.envelope.chunk_count == 129
        out = decode(received.payload)
        assert all(torch.equal(out[k], state[k]) for k in state)
    finally:
        set_max_message_size(128 * MiB)
        sender.close()
        receiver.close()


def test_messages_read_plainly_in_the_management_ui(rabbit: TestBroker) -> None:
    topology = Topology("ui", ("site-1",))
    aggregator = rabbit.connect("aggregator")
    aggregator.declare(topology)
    Outbox(aggregator, topology, sender="aggregator").send(
        ModelEnvelope,
        encode({"w": torch.ones(3)}),
        chunk_size=4096,
        job_id="job-7",
        algorithm="cwt",
        recipient="events",
        round=2,
        hop=0,
    )
    aggregator.close()
    # Site and aggregator queues have a single active consumer, which quorum queues do not
    # let the UI's "Get messages" read; the events and dead-letter queues it can.
    queue = quote(topology.events_queue)
    [shown] = api(
        "POST",
        f"queues/{quote(rabbit.vhost)}/{queue}/get",
        {"count": 1, "ackmode": "ack_requeue_true", "encoding": "base64", "truncate": 1},
    )
    properties = shown["properties"]
    assert properties["type"] == "model"
    assert properties["correlation_id"] == "job-7"
    assert properties["user_id"] == "aggregator"
    assert properties["content_type"] == "application/msgpack"
    assert properties["delivery_mode"] == 2
    assert len(properties["message_id"]) == 32
    assert properties["headers"] == {
        "job": "job-7",
        "algorithm": "cwt",
        "round": 2,
        "hop": 0,
        "sender": "aggregator",
        "recipient": "events",
        "chunk": "1/1",
    }
    info = rabbit.queue(topology.site_queue("site-1"))
    assert info["arguments"]["x-queue-type"] == "quorum"
    assert info["arguments"]["x-single-active-consumer"] is True
    assert info["arguments"]["x-dead-letter-exchange"] == "fedrelay.ui.dlx"


def test_a_broker_restart_is_survived(rabbit: TestBroker) -> None:
    topology = Topology("restart", ("site-1",))
    site = AmqpTransport(rabbit.settings("site-1", reconnect_attempts=12))
    site.declare(topology)
    generation = site._generation
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True)
    try:
        time.sleep(1)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True)
        subprocess.run(["rabbitmqctl", "await_startup"], check=True, capture_output=True)
    site.publish(
        "aggregator",
        Message(body=b"after", type="update", message_id="u", correlation_id="j", user_id="site-1"),
        exchange=topology.exchange,
    )
    assert site._generation > generation, "the connection was rebuilt"
    delivery = site.get(topology.aggregator_queue, timeout=10)
    assert delivery is not None and delivery.message.body == b"after"
    site.ack(delivery)
    site.close()


def connection_names(rabbit: TestBroker, user: str) -> list[str]:
    """The broker's names of ``user``'s open connections on the test's vhost."""
    connections = api("GET", f"vhosts/{quote(rabbit.vhost)}/connections")
    return [c["name"] for c in connections if c["user"] == user]


def other_name(host: str) -> str:
    """Another address of the same broker: the name of an IP address, or the IP of a name."""
    try:
        socket.inet_aton(host)
    except OSError:
        return socket.gethostbyname(host)
    return socket.gethostbyaddr(host)[0]


def test_a_closed_first_address_is_skipped_for_the_next_one(
    rabbit: TestBroker, caplog: pytest.LogCaptureFixture
) -> None:
    topology = Topology("failover", ("site-1",))
    closed = free_port()
    settings = rabbit.settings("site-1", host="127.0.0.1", port=closed, addresses=(f"{HOST}:5672",))
    with caplog.at_level(logging.WARNING, logger="relay.transport.amqp"):
        site = AmqpTransport(settings)
    try:
        assert site.endpoint == (HOST, 5672)
        assert f"RabbitMQ at 127.0.0.1:{closed} unreachable, attempt 1/8 failed" in caplog.text
        site.declare(topology)
        message = Message(
            body=b"over", type="update", message_id="u", correlation_id="j", user_id="site-1"
        )
        site.publish("aggregator", message, exchange=topology.exchange)
        delivery = site.get(topology.aggregator_queue, timeout=10)
        assert delivery is not None and delivery.message.body == b"over"
        site.ack(delivery)
    finally:
        site.close()


def test_a_connection_closed_by_the_broker_is_rebuilt_on_the_next_address(
    rabbit: TestBroker, caplog: pytest.LogCaptureFixture
) -> None:
    topology = Topology("failover", ("site-1",))
    alias = other_name(HOST)
    site = AmqpTransport(rabbit.settings("site-1", addresses=(f"{alias}:5672",)))
    try:
        assert site.endpoint == (HOST, 5672)
        site.declare(topology)
        before = Message(
            body=b"before", type="update", message_id="b", correlation_id="j", user_id="site-1"
        )
        site.publish("aggregator", before, exchange=topology.exchange)
        generation = site._generation
        deadline = time.monotonic() + 10  # the API lists a connection a moment after it opens
        while not (names := connection_names(rabbit, "site-1")):
            assert time.monotonic() < deadline, "the broker never listed the connection"
            time.sleep(0.2)
        [name] = names
        with caplog.at_level(logging.WARNING, logger="relay.transport.amqp"):
            api("DELETE", f"connections/{quote(name)}")
            after = Message(
                body=b"after", type="update", message_id="a", correlation_id="j", user_id="site-1"
            )
            site.publish("aggregator", after, exchange=topology.exchange)
        assert site._generation > generation, "the connection was rebuilt"
        assert site.endpoint == (alias, 5672)
        assert f"connected to RabbitMQ at {alias}:5672" in caplog.text
        bodies = []
        for _ in range(2):
            delivery = site.get(topology.aggregator_queue, timeout=10)
            assert delivery is not None
            bodies.append(delivery.message.body)
            site.ack(delivery)
        assert bodies == [b"before", b"after"]  # nothing lost with the connection
    finally:
        site.close()


def test_no_reachable_address_fails_naming_every_address() -> None:
    closed = [free_port(), free_port()]
    settings = BrokerSettings(
        port=closed[0],
        addresses=(f"127.0.0.1:{closed[1]}",),
        reconnect_attempts=2,
        reconnect_delay_s=0.05,
    )
    with pytest.raises(TransportError, match="after 2 attempts") as failed:
        AmqpTransport(settings)
    assert f"127.0.0.1:{closed[0]}, 127.0.0.1:{closed[1]}" in str(failed.value)


@pytest.mark.parametrize("address", ["amqp://mq2:5672", "mq2:", "mq2:99999", "fd00::2", "a b"])
def test_a_malformed_broker_address_is_named_with_the_expected_form(address: str) -> None:
    with pytest.raises(ValidationError, match=r"addresses\.1") as refused:
        BrokerSettings(addresses=("mq1", address))
    assert f"{address!r} is not a broker address" in str(refused.value)
    assert '"host" or "host:port"' in str(refused.value)
