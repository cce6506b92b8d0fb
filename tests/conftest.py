"""Shared fixtures: transports (parametrised, so each test runs on every transport)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.simulate import Federation, SimulationConfig
from relay.topology import Topology
from relay.transport import Transport
from relay.transport.memory import MemoryBroker, MemoryTransport
from tests.broker import TestBroker

Connect = Callable[[str], Transport]


@pytest.fixture(params=["memory", "amqp"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Opens connections, as a given user, to one fresh broker of the parametrised kind:
    the in-memory broker, or a fresh vhost on the real RabbitMQ."""
    opened: list[Transport] = []
    if request.param == "memory":
        broker = MemoryBroker()

        def open_as(user: str) -> Transport:
            transport: Transport = MemoryTransport(broker, user=user)
            opened.append(transport)
            return transport

        yield open_as
    else:
        rabbit = TestBroker()

        def open_as(user: str) -> Transport:
            transport: Transport = rabbit.connect(user)
            opened.append(transport)
            return transport

        try:
            yield open_as
        finally:
            for transport in opened:
                transport.close()
            rabbit.delete()
        return
    for transport in opened:
        transport.close()


@pytest.fixture(params=["memory", "amqp"])
def build(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[type[Federation]]:
    """Builds federations on the parametrised transport: in memory, or on real RabbitMQ."""
    built: list[Federation] = []
    rabbit = TestBroker() if request.param == "amqp" else None

    class Tracked(Federation):
        @classmethod
        def build(
            cls, config: SimulationConfig, spool: Path = tmp_path, **kw: object
        ) -> Federation:  # type: ignore[override]
            connect = rabbit.connect if rabbit is not None else None
            federation = Federation.build(config, spool / f"f{len(built)}", connect=connect)
            built.append(federation)
            return federation

    yield Tracked
    for federation in built:
        federation.close()
    if rabbit is not None:
        rabbit.delete()


@pytest.fixture
def topology() -> Topology:
    """A fresh federation with three sites."""
    return Topology(f"t{uuid.uuid4().hex[:8]}", ("site-1", "site-2", "site-3"))
