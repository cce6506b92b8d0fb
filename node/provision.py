"""``fedrelay provision``: a startup kit for every party and the broker's side of it.

From a federation file (its name, broker and sites; site sections may be empty), writes:

- ``roster.json``: every party's public keys (Ed25519 for signatures, X25519 for encryption)
  and whether payloads are encrypted;
- ``<party>/``, one per site and the aggregator: ``federation.toml`` (the party's own
  federation file: broker credentials, spool, ``[security]``), its private keys in
  ``keys/`` and, with TLS, its client certificate in ``tls/``. Private files are 0600;
- ``operator/``: RabbitMQ's ``definitions.json`` (the vhost, one user per party with the
  least rights it needs, a read-only monitoring user, an operator user who replays dead
  letters, the topology, policies), ``rabbitmq.conf`` lines that import it (and turn on TLS),
  ``enabled_plugins``, ``credentials.toml`` with the monitoring and operator users' passwords
  and, with TLS, the federation CA and the broker's certificate.

Broker rights per party (RabbitMQ checks each on every operation):

- configure ``^$``: no party declares or deletes anything; the topology is in the definitions;
- write: the federation exchange and its dead-letter exchange (a node dead-letters what it
  refuses by republishing it there);
- read: its own queue only (the aggregator also the events queue and the events log, to
  follow jobs);
- topic permissions on the federation exchange: routing keys ``site.*``, ``aggregator`` and
  ``events.*`` (a site never addresses anything else); on the dead-letter exchange, only its
  own queue's name.

The operator user (``fedrelay dead replay``) reads only the dead-letter queue and writes only
the federation exchange, with routing keys ``site.*`` and ``aggregator``; its ``impersonator``
tag lets it republish a dead letter under its original sender's ``user_id``, which receivers
insist on (the envelope's signature, unchanged, still proves the sender).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.config import FederationConfig
from relay.envelope import AGGREGATOR
from relay.errors import ConfigError
from relay.security import generate, write_private
from relay.topology import Topology
from relay.transport.amqp import split_address

ROSTER_FILE = "roster.json"
OPERATOR = "operator"
CERT_DAYS = 825
"""Validity of the certificates: the longest that TLS clients commonly accept."""

TLS_PORT = 5671

DATA_HINT = """
# Before starting the node, say where this site's cases are (see the README), e.g.:
# [sites.{site}.data]
# kind = "msd"            # or "brats"
# path = "/data/Task01_BrainTumour"
"""


def monitor_user(federation: str) -> str:
    """The read-only monitoring user of a federation."""
    return f"{federation}-monitor"


def operator_user(federation: str) -> str:
    """The user that replays a federation's dead letters (``fedrelay dead replay``)."""
    return f"{federation}-operator"


def password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt ‖ sha256(salt ‖ password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"


def _any_of(*names: str) -> str:
    """A permission pattern matching exactly these names."""
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def definitions(topology: Topology, vhost: str, passwords: dict[str, str | None]) -> dict[str, Any]:
    """RabbitMQ definitions for ``topology`` on ``vhost``; ``passwords`` maps each user (every
    party, the monitoring and the operator user) to its password, or None for certificate-only
    login."""
    exchange, dlx = topology.exchange, topology.dead_letter_exchange
    writable = f"^{re.escape(exchange)}(\\.dlx)?$"
    routes = r"^(site\.[a-z0-9][a-z0-9_-]*|aggregator|events\.[a-z_]+)$"
    inboxes = r"^(site\.[a-z0-9][a-z0-9_-]*|aggregator)$"
    dead = topology.dead_queue
    monitor = monitor_user(topology.federation)
    operator = operator_user(topology.federation)
    # RabbitMQ lets only an `impersonator` publish under another user's user_id (the
    # administrator tag does not); `management` opens the HTTP API for `dead list`/`show`.
    tags = {monitor: ["monitoring"], operator: ["management", "impersonator"]}
    users, permissions, topic_permissions = [], [], []
    for user, password in passwords.items():
        users.append(
            {
                "name": user,
                "password_hash": "" if password is None else password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": tags.get(user, []),
                "limits": {},
            }
        )
        if user == monitor:
            # It follows events and peeks dead letters (`fedrelay status`), requeueing them.
            read = _any_of(topology.events_queue, topology.log_queue, topology.dead_queue)
            rights = {"configure": "^$", "write": "^$", "read": read}
            permissions.append({"user": user, "vhost": vhost, **rights})
            continue
        if user == operator:
            # It takes dead letters and republishes them to a site or the aggregator.
            rights = {"configure": "^$", "write": _exact(exchange), "read": _exact(dead)}
            permissions.append({"user": user, "vhost": vhost, **rights})
            topic_permissions.append(
                {"user": user, "vhost": vhost, "exchange": exchange, "write": inboxes, "read": "^$"}
            )
            continue
        own = topology.queue_of(user)
        readable = (
            (own, topology.events_queue, topology.log_queue) if user == AGGREGATOR else (own,)
        )
        permissions.append(
            {
                "user": user,
                "vhost": vhost,
                "configure": "^$",
                "write": writable,
                "read": _any_of(*readable),
            }
        )
        topic_permissions += [
            {"user": user, "vhost": vhost, "exchange": exchange, "write": routes, "read": "^$"},
            {"user": user, "vhost": vhost, "exchange": dlx, "write": _exact(own), "read": "^$"},
        ]
    queues = [
        {
            "name": queue,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": topology.queue_arguments(queue),
        }
        for queue in topology.queues()
    ]
    exchanges = [
        {
            "name": name,
            "vhost": vhost,
            "type": "topic",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        for name in (exchange, dlx)
    ]
    bindings = [
        {
            "source": source,
            "vhost": vhost,
            "destination": queue,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": {},
        }
        for source, queue, key in [
            *((exchange, queue, key) for queue, key in topology.bindings()),
            (dlx, topology.dead_queue, "#"),
        ]
    ]
    policies = [
        {
            # Dead letters wait for a person, but not without bound: past 1 GiB the oldest go.
            "vhost": vhost,
            "name": f"fedrelay-{topology.federation}-dead-letters",
            "pattern": _exact(topology.dead_queue),
            "apply-to": "queues",
            "definition": {"max-length-bytes": 2**30},
            "priority": 1,
        }
    ]
    return {
        "rabbit_version": "3.10.8",
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": [],
        "global_parameters": [],
        "policies": policies,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    }


def tls_port(config: FederationConfig) -> int:
    """The broker's TLS port: the federation file's, or AMQPS's 5671 for a file left at 5672."""
    return TLS_PORT if config.broker.port == 5672 else config.broker.port


def rabbitmq_conf(config: FederationConfig, definitions_path: Path, tls: Path | None) -> str:
    """The ``rabbitmq.conf`` lines for a federation: import its definitions at boot, and, with
    TLS, a TLS-only listener that requires client certificates and logs parties in by them."""
    lines = [
        f"# fedrelay federation {config.federation!r}, written by `fedrelay provision`",
        "# Users, permissions, queues and policies are imported from the definitions at boot.",
        "definitions.import_backend = local_filesystem",
        f"definitions.local.path = {definitions_path}",
        "# Guests stay on loopback; every party has its own user.",
        "loopback_users.guest = true",
    ]
    if tls is not None:
        lines += [
            "# TLS: parties present certificates of the federation CA; their common name is",
            "# their user name (plugin rabbitmq_auth_mechanism_ssl, in enabled_plugins).",
            f"listeners.ssl.default = {tls_port(config)}",
            f"ssl_options.cacertfile = {tls / 'ca.pem'}",
            f"ssl_options.certfile = {tls / 'server.pem'}",
            f"ssl_options.keyfile = {tls / 'server.key'}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "ssl_options.versions.1 = tlsv1.3",
            "ssl_options.versions.2 = tlsv1.2",
            "ssl_cert_login_from = common_name",
            "auth_mechanisms.1 = EXTERNAL",
            "auth_mechanisms.2 = PLAIN",
            "# TLS only: no plain AMQP listener (remove if other tenants of this broker need one).",
            "listeners.tcp = none",
        ]
    return "\n".join(lines) + "\n"


class Authority:
    """The federation's certificate authority (ECDSA P-256, which every TLS stack speaks)."""

    def __init__(self, federation: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedrelay {federation} CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.name = name
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, common_name: str, *, server_names: list[str] | None = None
    ) -> tuple[bytes, bytes]:
        """A certificate and its key (PEM) for a party (client) or the broker (server)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server_names is None:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        else:
            usage = ExtendedKeyUsageOID.SERVER_AUTH
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in server_names]),
                critical=False,
            )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return certificate.public_bytes(serialization.Encoding.PEM), _pem(key)

    def pem(self) -> bytes:
        """The CA certificate, which every party and the broker trust."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address, as broker.addresses has it


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _party_file(
    config: FederationConfig, party: str, password: str | None, *, tls: bool
) -> dict[str, Any]:
    """The party's own federation file: its section filled in, the others' left empty."""
    broker = config.broker.model_dump(mode="json", exclude={"tls"})
    if tls:
        broker["port"] = tls_port(config)
        # The cluster's other nodes listen for TLS on the same port as the first.
        broker["addresses"] = [
            f"{_bracketed(host)}:{tls_port(config) if port == config.broker.port else port}"
            for host, port in (
                split_address(a, config.broker.port) for a in config.broker.addresses
            )
        ]
        broker["tls"] = {"ca": "tls/ca.pem", "cert": "tls/client.pem", "key": "tls/client.key"}
    data: dict[str, Any] = {
        "federation": config.federation,
        "broker": broker,
        "security": {"roster": ROSTER_FILE, "keys": "keys"},
    }
    own: dict[str, Any] = {} if password is None else {"password": password}
    if party == AGGREGATOR:
        given = config.aggregator
        own["spool"] = str(given.spool if given else f"/var/lib/fedrelay/{AGGREGATOR}/spool")
        own["output"] = str(given.output if given else f"/var/lib/fedrelay/{AGGREGATOR}/jobs")
        data["aggregator"] = own
        data["sites"] = {site: {} for site in config.sites}
        return data
    given_site = config.sites.get(party)
    own["spool"] = str(given_site.spool if given_site else f"/var/lib/fedrelay/{party}/spool")
    if given_site is not None:
        extra = given_site.model_dump(mode="json", exclude={"password", "spool"}, exclude_none=True)
        own.update(extra)
    data["sites"] = {site: (own if site == party else {}) for site in config.sites}
    return data


def provision(
    config: FederationConfig,
    output: Path,
    *,
    tls: bool = False,
    encrypt_payloads: bool = False,
    broker_names: tuple[str, ...] = (),
) -> list[Path]:
    """Write every party's startup kit and the operator's files under ``output``; return the
    kit folders. Refuses to write into a folder that already holds a kit: new keys would
    silently split the federation."""
    if output.exists() and any(output.iterdir()):
        raise ConfigError(
            f"{output} is not empty; provisioning anew makes new keys that the running parties "
            "do not have. Choose an empty folder"
        )
    topology = config.topology()
    parties = [AGGREGATOR, *config.sites]
    roster, identities = generate(config.federation, parties, encrypt_payloads=encrypt_payloads)
    output.mkdir(parents=True, exist_ok=True)
    roster.save(output / ROSTER_FILE)
    authority = Authority(config.federation) if tls else None
    passwords: dict[str, str | None] = {}
    kits = []
    for party in parties:
        kit = output / party
        kit.mkdir(mode=0o700)
        # With client certificates the broker logs a party in by its certificate alone.
        password = None if tls else secrets.token_urlsafe(24)
        passwords[party] = password
        identities[party].save(kit / "keys")
        roster.save(kit / ROSTER_FILE)
        if authority is not None:
            folder = kit / "tls"
            folder.mkdir(mode=0o700)
            cert, key = authority.issue(party)
            (folder / "ca.pem").write_bytes(authority.pem())
            (folder / "client.pem").write_bytes(cert)
            write_private(folder / "client.key", key)
        text = tomli_w.dumps(_party_file(config, party, password, tls=tls))
        if party != AGGREGATOR and config.sites.get(party) is None:
            text += DATA_HINT.format(site=party)
        write_private(kit / "federation.toml", text.encode())
        kits.append(kit)
    monitor_password = secrets.token_urlsafe(24)
    passwords[monitor_user(config.federation)] = monitor_password
    operator_password = secrets.token_urlsafe(24)
    passwords[operator_user(config.federation)] = operator_password
    operator = output / OPERATOR
    operator.mkdir(mode=0o700)
    tls_folder = None
    if authority is not None:
        tls_folder = operator / "tls"
        tls_folder.mkdir(mode=0o700)
        # Parties check the certificate against the node they dial: it names every node.
        hosts = [split_address(a)[0] for a in config.broker.addresses]
        names = list(broker_names) or list(dict.fromkeys([config.broker.host, *hosts]))
        cert, key = authority.issue(names[0], server_names=names)
        (tls_folder / "ca.pem").write_bytes(authority.pem())
        (tls_folder / "server.pem").write_bytes(cert)
        write_private(tls_folder / "server.key", key)
        # The CA's key mints identities: it stays with whoever provisions, not on the broker.
        (operator / "ca").mkdir(mode=0o700)
        write_private(operator / "ca" / "ca.key", _pem(authority.key))
    defs = definitions(topology, config.broker.vhost, passwords)
    write_private(operator / "definitions.json", json.dumps(defs, indent=2).encode())
    conf = rabbitmq_conf(
        config,
        (operator / "definitions.json").resolve(),
        None if tls_folder is None else tls_folder.resolve(),
    )
    (operator / "rabbitmq.conf").write_text(conf)
    plugins = ["rabbitmq_management"] + (["rabbitmq_auth_mechanism_ssl"] if tls else [])
    (operator / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
    credentials = {
        "monitor": {"user": monitor_user(config.federation), "password": monitor_password},
        "operator": {"user": operator_user(config.federation), "password": operator_password},
    }
    write_private(operator / "credentials.toml", tomli_w.dumps(credentials).encode())
    os.chmod(output, 0o755)
    return kits
