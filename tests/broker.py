"""The real RabbitMQ for tests: a fresh vhost per test, users made through the management API.

A missing broker fails the test that needs it, with the command that starts one; it never
skips (CI's .ci/run starts the broker before the tests).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from node.operate import ManagementApi, quote
from relay.errors import TransportError
from relay.transport.amqp import AmqpTransport, BrokerSettings

HOST = os.environ.get("FEDRELAY_TEST_BROKER_HOST", "127.0.0.1")
API = f"http://{HOST}:15672/api"
ADMIN = ("guest", "guest")
PASSWORD = "fedrelay-test"


def api(method: str, path: str, body: Any = None) -> Any:
    """Call the management HTTP API as the admin user."""
    try:
        return ManagementApi(API.removesuffix("/api"), user=ADMIN[0], password=ADMIN[1]).call(
            method, path, body
        )
    except TransportError as e:
        raise RuntimeError(
            f"{e}. Is the broker up? (rabbitmq-server -detached; rabbitmqctl await_startup; "
            "rabbitmq-plugins enable rabbitmq_management)"
        ) from e


class TestBroker:
    """One fresh vhost; connections as any user name, each a real broker user."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, *, heartbeat_s: int = 60) -> None:
        self.vhost = f"fedrelay-test-{uuid.uuid4().hex[:10]}"
        self.heartbeat_s = heartbeat_s
        self.users: set[str] = set()
        api("PUT", f"vhosts/{quote(self.vhost)}", {})

    def settings(self, user: str, **overrides: Any) -> BrokerSettings:
        """Settings to connect as ``user`` (created with full rights on this vhost)."""
        if user not in self.users:
            api("PUT", f"users/{quote(user)}", {"password": PASSWORD, "tags": ""})
            rights = {"configure": ".*", "write": ".*", "read": ".*"}
            api("PUT", f"permissions/{quote(self.vhost)}/{quote(user)}", rights)
            self.users.add(user)
        values = {
            "host": HOST,
            "vhost": self.vhost,
            "username": user,
            "password": PASSWORD,
            "heartbeat_s": self.heartbeat_s,
            "reconnect_delay_s": 0.2,
        }
        return BrokerSettings.model_validate(values | overrides)

    def connect(self, user: str) -> AmqpTransport:
        """A new connection as ``user``."""
        return AmqpTransport(self.settings(user))

    def queue(self, name: str) -> dict[str, Any]:
        """The management API's view of a queue."""
        result: dict[str, Any] = api("GET", f"queues/{quote(self.vhost)}/{quote(name)}")
        return result

    def delete(self) -> None:
        """Remove the vhost and everything in it."""
        api("DELETE", f"vhosts/{quote(self.vhost)}")
