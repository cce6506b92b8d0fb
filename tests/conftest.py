"""Shared fixtures: transports (parametrised, so each test runs on every transport)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from relay.topology import Topology
from relay.transport import Transport
from relay.transport.memory import MemoryBroker, MemoryTransport

Connect = Callable[[str], Transport]


@pytest.fixture(params=["memory"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Opens connections, as a given user, to one fresh broker of the parametrised kind."""
    opened: list[Transport] = []
    broker = MemoryBroker(max_message_size=1024 * 1024)

    def open_as(user: str) -> Transport:
        transport = MemoryTransport(broker, user=user)
        opened.append(transport)
        return transport

    yield open_as
    for transport in opened:
        transport.close()


@pytest.fixture
def topology() -> Topology:
    """A fresh federation with three sites."""
    return Topology(f"t{uuid.uuid4().hex[:8]}", ("site-1", "site-2", "site-3"))
