"""What only the real broker can show: heartbeats during training, large models, its limits."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from relay.codec import Encoding, decode, encode
from relay.envelope import ModelEnvelope
from relay.errors import MessageTooLarge
from relay.messaging import Inbox, Outbox
from relay.topology import Topology
from relay.transport import Message
from relay.transport.amqp import AmqpTransport
from tests.broker import TestBroker, api, quote

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
