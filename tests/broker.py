"""The real RabbitMQ for tests: a fresh vhost per test, users made through the management API.

A missing broker fails the test that needs it, with the command that starts one; it never
skips (CI's .ci/run starts the broker before the tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
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


def federation_header(federation: str, root: Path, broker: TestBroker) -> list[str]:
    """The start of a federation file on ``broker``: [broker] and [aggregator], spooled and
    written under ``root``; the caller adds the sites."""
    return [
        f'federation = "{federation}"',
        "[broker]",
        f'host = "{HOST}"',
        f'vhost = "{broker.vhost}"',
        "heartbeat_s = 10",
        "[aggregator]",
        f'password = "{PASSWORD}"',
        f'spool = "{root / "spool" / "aggregator"}"',
        f'output = "{root / "results"}"',
    ]


def phantom_sites(
    sites: Sequence[str],
    root: Path,
    *,
    cases_per_site: int,
    volume_size: int,
    password: str | None = None,
) -> list[str]:
    """The [sites.*] sections of a federation file: each site spooled under ``root``/spool
    with its share of generated phantom data (and, given one, its broker password)."""
    lines: list[str] = []
    for index, site in enumerate(sites):
        lines += [
            f"[sites.{site}]",
            *([f'password = "{password}"'] if password is not None else []),
            f'spool = "{root / "spool" / site}"',
            f"[sites.{site}.data]",
            f"index = {index}",
            f"of = {len(sites)}",
            f"cases_per_site = {cases_per_site}",
            f"volume_size = {volume_size}",
        ]
    return lines


def write_federation(root: Path, lines: Sequence[str]) -> Path:
    """Write ``lines`` as ``root``/federation.toml; return its path."""
    path = root / "federation.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def stop_processes(processes: Iterable[subprocess.Popen[Any]]) -> None:
    """SIGTERM every process still running (waking any frozen one first) so that each
    finishes its message in hand; SIGKILL those not gone within 30 s."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class SecondBroker:
    """Another RabbitMQ node on this machine, set up as an operator would from a provisioned
    ``operator/`` folder: its rabbitmq.conf (definitions import, TLS-only listener) and files,
    copied where the broker's user can read them. Fails, never skips, if it cannot start."""

    __test__ = False

    def __init__(self, operator: Path, *, plugins: str = "rabbitmq_auth_mechanism_ssl") -> None:
        self.node = f"fedrelay-test-{uuid.uuid4().hex[:8]}@localhost"
        self.home = Path(tempfile.mkdtemp(prefix="fedrelay-broker-"))
        shutil.copytree(operator, self.home / "etc")
        conf = (self.home / "etc" / "rabbitmq.conf").read_text()
        conf = conf.replace(str(operator.resolve()), str(self.home / "etc"))
        (self.home / "etc" / "rabbitmq.conf").write_text(conf)
        # By default only the plugin the TLS login needs: the management plugin would want the
        # main node's port.
        (self.home / "etc" / "enabled_plugins").write_text(f"[{plugins}].\n")
        self.home.chmod(0o755)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.home)], check=True)
        env = os.environ | {
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.home / "etc" / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "etc" / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self.home / "pid"),
        }
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, cwd=self.home)
        # await_startup needs the node to exist; right after -detached it may not yet.
        deadline = time.monotonic() + 90
        while True:
            started = subprocess.run(
                ["rabbitmqctl", "--node", self.node, "await_startup", "--timeout", "60"],
                capture_output=True,
                text=True,
                check=False,
            )
            if started.returncode == 0:
                return
            if time.monotonic() > deadline:
                logs = "".join(p.read_text()[-3000:] for p in (self.home / "log").glob("*.log"))
                self.stop()
                raise RuntimeError(
                    f"second RabbitMQ node {self.node} did not start: {started.stderr} {logs}"
                )
            time.sleep(1)

    def setting(self, app: str, key: str) -> str:
        """A setting as the running node has it (``rabbitmqctl eval``)."""
        shown = subprocess.run(
            ["rabbitmqctl", "--node", self.node, "eval", f"application:get_env({app}, {key})."],
            capture_output=True,
            text=True,
            check=True,
        )
        return shown.stdout.strip()

    def stop(self) -> None:
        """Stop the node and delete its files."""
        subprocess.run(
            ["rabbitmqctl", "--node", self.node, "stop"], capture_output=True, check=False
        )
        shutil.rmtree(self.home, ignore_errors=True)
