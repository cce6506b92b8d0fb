"""Identities, signatures, encryption, provisioned broker rights and TLS, on the real broker."""

from __future__ import annotations

import base64
import json
import stat
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pika
import pika.exceptions as pe
import pytest
import torch
from pydantic import SecretStr

import relay.security
from node.audit import audit
from node.config import FederationConfig, load
from node.dead import peek
from node.models import initial_weights
from node.operate import ManagementApi, quote
from node.options import JobOptions
from node.process import aggregator, site_node
from node.provision import OPERATOR, Authority, monitor_user, operator_user, provision
from node.results import save_model
from node.site import SiteNode
from relay.codec import decode, digest, encode
from relay.envelope import ModelEnvelope, to_wire
from relay.errors import (
    AccessRefused,
    ConfigError,
    EnvelopeError,
    InvalidInput,
    TransportError,
)
from relay.frame import decode_frame, encode_frame
from relay.jobspec import JobSpec
from relay.messaging import sign
from relay.runner import run_until
from relay.security import Identity, Roster, Security, generate, signed_bytes
from relay.transport import Message, Transport
from relay.transport.amqp import AmqpTransport
from relay.workflows.coordinator import Coordinator
from relay.workflows.state import Status
from tests.broker import API, SecondBroker, api, free_port, phantom_sites, write_federation

SITES = ("site-1", "site-2", "site-3")


def keys(encrypt: bool = False) -> dict[str, Security]:
    roster, identities = generate("fed", ["aggregator", *SITES], encrypt_payloads=encrypt)
    return {name: Security(identity, roster) for name, identity in identities.items()}


def envelope(**changes: Any) -> ModelEnvelope:
    fields: dict[str, Any] = {
        "job_id": "job",
        "algorithm": "fedavg",
        "sender": "aggregator",
        "recipient": "site-1",
        "payload_digest": "0" * 64,
        "payload_size": 0,
    }
    return ModelEnvelope(**(fields | changes))


# -- signatures and sealing, without a broker ------------------------------------------------


def test_a_signed_envelope_verifies_and_any_change_or_other_signer_is_refused() -> None:
    parties = keys()
    site_1 = parties["site-1"]
    signed = sign(envelope(), parties["aggregator"])
    site_1.verify(to_wire(signed), "aggregator")
    for field, value in [("round", 3), ("payload_digest", "1" * 64), ("recipient", "site-2")]:
        altered = to_wire(signed) | {field: value}
        with pytest.raises(EnvelopeError, match="forged or tampered"):
            site_1.verify(altered, "aggregator")
    with pytest.raises(EnvelopeError, match=r"^unsigned"):
        site_1.verify(to_wire(envelope()), "aggregator")
    by_site_2 = sign(envelope(), parties["site-2"])  # a real party's key, not the sender's
    with pytest.raises(EnvelopeError, match="forged or tampered"):
        site_1.verify(to_wire(by_site_2), "aggregator")
    strangers, mallory = generate("fed", ["mallory"], encrypt_payloads=False)
    outsider = Security(mallory["mallory"], strangers)
    with pytest.raises(EnvelopeError, match="'mallory' is not in the roster"):
        site_1.verify(to_wire(sign(envelope(sender="mallory"), outsider)), "mallory")
    # The same parties' keys in another federation: the signature does not carry over.
    roster, identities = generate("other", ["aggregator", "site-1"], encrypt_payloads=False)
    elsewhere = Security(identities["aggregator"], roster)
    foreign = sign(envelope(), elsewhere)
    twin = Security(identities["site-1"], roster.model_copy(update={"federation": "fed"}))
    with pytest.raises(EnvelopeError, match="forged or tampered"):
        twin.verify(to_wire(foreign), "aggregator")


def test_a_sealed_payload_opens_only_at_its_recipient_and_detects_tampering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay.security, "SEGMENT", 1000)  # several segments, in a small test
    parties = keys(encrypt=True)
    plaintext = bytes(range(256)) * 20
    ciphertext, sealed = parties["aggregator"].seal(plaintext, recipient="site-1", job_id="j")
    assert len(ciphertext) == len(plaintext) + 16 * 6 and plaintext[:64] not in ciphertext
    opened = parties["site-1"].open(bytes(ciphertext), sealed, sender="aggregator", job_id="j")
    assert opened == plaintext
    with pytest.raises(InvalidInput, match="not encrypted for 'site-2'"):
        parties["site-2"].open(bytes(ciphertext), sealed, sender="aggregator", job_id="j")
    with pytest.raises(InvalidInput, match="authentication failed"):  # bound to its job
        parties["site-1"].open(bytes(ciphertext), sealed, sender="aggregator", job_id="k")
    flipped = bytearray(ciphertext)
    flipped[1500] ^= 1
    with pytest.raises(InvalidInput, match="authentication failed"):
        parties["site-1"].open(bytes(flipped), sealed, sender="aggregator", job_id="j")
    # Dropping the last segment leaves whole segments that decrypt, but the count and the
    # last segment's flag catch it.
    with pytest.raises(InvalidInput, match="cut or padded"):
        parties["site-1"].open(bytes(ciphertext[:-136]), sealed, sender="aggregator", job_id="j")
    short = sealed.model_copy(update={"plaintext_size": 5000})
    with pytest.raises(InvalidInput, match="authentication failed"):
        parties["site-1"].open(bytes(ciphertext[:-136]), short, sender="aggregator", job_id="j")


def test_private_keys_are_owner_only_and_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    identity = Identity.generate("site-1")
    identity.save(tmp_path / "keys")
    for path in (tmp_path / "keys").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert Identity.load("site-1", tmp_path / "keys").public() == identity.public()
    (tmp_path / "keys" / "signing.key").chmod(0o644)
    with pytest.raises(ConfigError, match="lets others read this private key; run `chmod 600"):
        Identity.load("site-1", tmp_path / "keys")


# -- provisioning ------------------------------------------------------------------------------


def federation_file(tmp_path: Path, *, port: int = 5672, host: str = "127.0.0.1") -> Path:
    """A federation file with phantom data for every site, as an operator would write it."""
    name = f"sec{uuid.uuid4().hex[:8]}"
    lines = [
        f'federation = "{name}"',
        "[broker]",
        f'host = "{host}"',
        f"port = {port}",
        f'vhost = "{name}"',
        "[aggregator]",
        f'spool = "{tmp_path / "spool" / "aggregator"}"',
        f'output = "{tmp_path / "jobs"}"',
    ]
    sites = phantom_sites(SITES, tmp_path, cases_per_site=4, volume_size=16)
    return write_federation(tmp_path, lines + sites)


def kits(tmp_path: Path, **options: Any) -> tuple[Path, dict[str, FederationConfig]]:
    """Provision a federation; return the kits' folder and each party's loaded file."""
    source = load(federation_file(tmp_path, **options.pop("file", {})), environ={})
    output = tmp_path / "kits"
    provision(source, output, **options)
    configs = {
        party: load(output / party / "federation.toml", environ={})
        for party in ("aggregator", *SITES)
    }
    return output, configs


@pytest.fixture
def imported() -> Iterator[list[Path]]:
    """Imports provisioned definitions into the real broker; removes them afterwards."""
    imported: list[Path] = []
    yield imported
    for output in imported:
        definitions = json.loads((output / OPERATOR / "definitions.json").read_text())
        for vhost in definitions["vhosts"]:
            api("DELETE", f"vhosts/{quote(vhost['name'])}")
            api("DELETE", f"users/{quote(monitor_user(vhost['name']))}")
            api("DELETE", f"users/{quote(operator_user(vhost['name']))}")


def import_definitions(output: Path, imported: list[Path]) -> None:
    """What the operator does with operator/definitions.json (here through the HTTP API)."""
    imported.append(output)
    api("POST", "definitions", json.loads((output / OPERATOR / "definitions.json").read_text()))


def test_provision_writes_a_kit_per_party_with_private_files_owner_only(tmp_path: Path) -> None:
    output, configs = kits(tmp_path, encrypt_payloads=True)
    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["aggregator", *SITES, OPERATOR, "roster.json"]
    )
    private = [*output.glob("*/keys/*.key"), *output.glob("*/federation.toml")]
    private += [output / OPERATOR / "definitions.json", output / OPERATOR / "credentials.toml"]
    assert len(private) == 2 * 4 + 4 + 2
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    roster = (output / "roster.json").read_text()
    definitions = (output / OPERATOR / "definitions.json").read_text()
    for path in output.glob("*/keys/*.key"):
        secret = "".join(path.read_text().splitlines()[1:-1])
        assert secret not in roster and secret not in definitions
    for party, config in configs.items():
        security = config.party_security(party)
        assert security is not None and security.roster.encrypt_payloads
        assert config.broker.vhost == config.federation
        section = config.aggregator_section() if party == "aggregator" else config.site(party)
        password = section.password
        assert password is not None and password.get_secret_value() not in definitions
    assert configs["site-1"].sites["site-2"] is None  # a site's kit holds no other's secrets
    with pytest.raises(ConfigError, match="is not empty; provisioning anew makes new keys"):
        provision(configs["site-1"], output)


def test_a_kit_whose_site_has_no_data_yet_says_so_without_showing_its_password(
    tmp_path: Path,
) -> None:
    source = tmp_path / "federation.toml"
    source.write_text('federation = "bare"\n[sites.site-1]\n[sites.site-2]\n')
    provision(load(source, environ={}), tmp_path / "kits")
    kit = tmp_path / "kits" / "site-1" / "federation.toml"
    text = kit.read_text()
    assert "# [sites.site-1.data]" in text  # the hint where the site's data goes
    password = tomllib.loads(text)["sites"]["site-1"]["password"]
    with pytest.raises(ConfigError, match="give the site either") as refused:
        load(kit, environ={})
    assert password not in str(refused.value)


def _publish_raw(transport: AmqpTransport, key: str, exchange: str, user_id: str) -> None:
    message = Message(body=b"x", type="model", message_id="m", correlation_id="j", user_id=user_id)
    transport.publish(key, message, exchange=exchange)


def assert_refused(who: str, attempts: dict[str, Callable[[], object]]) -> None:
    """Each attempt is refused by the broker (AccessRefused)."""
    for what, attempt in attempts.items():
        with pytest.raises(AccessRefused):
            attempt()
            pytest.fail(f"{who} was allowed {what}")


def test_provisioned_users_have_only_the_rights_they_need(
    tmp_path: Path, imported: list[Path]
) -> None:
    output, configs = kits(tmp_path)
    import_definitions(output, imported)
    config = configs["site-1"]
    topology = config.topology()
    settings = config.broker_settings("site-1", config.site("site-1").password)
    site_1 = AmqpTransport(settings)
    try:
        # What it needs: publish to another site, to the aggregator and events; read its queue.
        for key in ("site.site-2", "aggregator", "events.metrics"):
            _publish_raw(site_1, key, topology.exchange, "site-1")
        assert site_1.get(topology.site_queue("site-1"), timeout=0.2) is None
        refusals: dict[str, Callable[[], object]] = {
            "another site's queue": lambda: site_1.get(topology.site_queue("site-2"), 0.2),
            "the dead letters": lambda: site_1.get(topology.dead_queue, 0.2),
            "another user_id": lambda: _publish_raw(
                site_1, "site.site-2", topology.exchange, "site-2"
            ),
            "a routing key outside its rights": lambda: _publish_raw(
                site_1, "admin.anything", topology.exchange, "site-1"
            ),
            "another queue's dead letters": lambda: _publish_raw(
                site_1, topology.site_queue("site-2"), topology.dead_letter_exchange, "site-1"
            ),
            "declaring the topology": lambda: site_1.declare(topology),
        }
        assert_refused("site-1", refusals)
    finally:
        site_1.close()
    # Deleting is refused too (the transport has no delete: the operator's tools do it).
    connection = pika.BlockingConnection(settings.parameters())
    with pytest.raises(pe.ChannelClosedByBroker, match="ACCESS_REFUSED"):
        connection.channel().queue_delete(topology.site_queue("site-2"))
    connection.close()
    # The monitoring user reads the events and the dead letters, and nothing else.
    monitor = tomllib.loads((output / OPERATOR / "credentials.toml").read_text())["monitor"]
    watcher = AmqpTransport(
        settings.model_copy(
            update={"username": monitor["user"], "password": SecretStr(monitor["password"])}
        )
    )
    try:
        assert watcher.get(topology.events_queue, timeout=0.5) is not None  # site-1's event
        assert watcher.get(topology.dead_queue, timeout=0.2) is None
        with pytest.raises(AccessRefused):
            watcher.get(topology.site_queue("site-1"), timeout=0.2)
    finally:
        watcher.close()
    # The operator (`dead replay`) takes dead letters and republishes them to a site or the
    # aggregator as their original sender (its impersonator tag), and can do nothing else.
    credentials = tomllib.loads((output / OPERATOR / "credentials.toml").read_text())["operator"]
    assert credentials["user"] == operator_user(config.federation)
    operator = AmqpTransport(
        settings.model_copy(
            update={
                "username": credentials["user"],
                "password": SecretStr(credentials["password"]),
            }
        )
    )
    try:
        assert operator.take(topology.dead_queue) is None
        for key, user_id in (("site.site-2", "site-1"), ("aggregator", "site-3")):
            _publish_raw(operator, key, topology.exchange, user_id)
        operator_refusals: dict[str, Callable[[], object]] = {
            "a site's queue": lambda: operator.take(topology.site_queue("site-1")),
            "the events": lambda: operator.take(topology.events_queue),
            "publishing an event": lambda: _publish_raw(
                operator, "events.metrics", topology.exchange, "site-1"
            ),
            "dead-lettering": lambda: _publish_raw(
                operator, topology.site_queue("site-1"), topology.dead_letter_exchange, "site-1"
            ),
            "declaring the topology": lambda: operator.declare(topology),
        }
        assert_refused("the operator", operator_refusals)
    finally:
        operator.close()
    # Its management tag lets it list the dead letters itself, through the HTTP API.
    http = ManagementApi(
        API.removesuffix("/api"), user=credentials["user"], password=credentials["password"]
    )
    assert peek(http, config.broker.vhost, topology) == []
    user = api("GET", f"users/{quote(credentials['user'])}")
    assert sorted(user["tags"]) == ["impersonator", "management"]


def tiny_job(config: FederationConfig) -> JobSpec:
    options = {"algorithm": "fedavg", "rounds": 2, "local_epochs": 1, "width": 4, "depth": 3}
    return JobOptions.model_validate(options).job(
        federation=config.federation, sites=list(config.sites)
    )


def parties(configs: dict[str, FederationConfig]) -> tuple[Coordinator, list[SiteNode]]:
    """Every party built from its own kit, the way `fedrelay node run` builds it."""
    return aggregator(configs["aggregator"]), [site_node(configs[s], s) for s in SITES]


def test_a_provisioned_federation_refuses_forged_tampered_unsigned_and_replayed_envelopes(
    tmp_path: Path, imported: list[Path]
) -> None:
    output, configs = kits(tmp_path, encrypt_payloads=True)
    import_definitions(output, imported)
    coordinator, sites = parties(configs)
    job = tiny_job(configs["aggregator"])
    topology = coordinator.topology
    sent: list[Message] = []
    publish = coordinator.transport.publish

    def recording(routing_key: str, message: Message, *, exchange: str) -> None:
        if routing_key == "site.site-1" and message.type == "model":
            sent.append(message)
        publish(routing_key, message, exchange=exchange)

    coordinator.transport.publish = recording  # type: ignore[method-assign]
    # Someone holding site-2's broker password, but not its signing key, writes to site-1.
    site_2 = sites[1]
    payload = encode({"w": torch.zeros(4)})
    unsigned = envelope(
        job_id=job.job_id,
        sender="site-2",
        payload_size=len(payload),
        payload_digest=digest(payload),
    )
    forger = Identity.generate("site-2")
    signature = forger.signing.sign(signed_bytes(to_wire(unsigned), job.federation))
    forged = unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})
    assert site_2.outbox.security is not None
    altered = sign(unsigned, site_2.outbox.security).model_copy(update={"round": 1})
    for bad in (unsigned, forged, altered):
        _send(site_2.transport, topology.exchange, bad, payload)
    state = coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    # A copy of the aggregator's model with one payload byte changed on the way.
    model = sent[0]
    tampered = bytearray(model.body)
    tampered[-1] ^= 1
    publish("site.site-1", replace(model, body=bytes(tampered)), exchange=topology.exchange)
    # What the broker holds for site-1 is ciphertext: its operator cannot read the weights.
    header, body = decode_frame(model.body)
    assert header.sealed is not None
    with pytest.raises(InvalidInput):
        decode(body)
    biggest = max(initial_weights(job.model, seed=job.seed).values(), key=torch.numel)
    assert biggest.numpy().tobytes()[:64] not in model.body
    with pytest.raises(InvalidInput, match="not encrypted for 'site-2'"):
        site_2.outbox.security.open(body, header.sealed, sender="aggregator", job_id=job.job_id)

    run_until([coordinator, *sites], lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    assert len(state.rounds) == 2 and all(not r.missing for r in state.rounds)
    # The aggregator's first model to site-1, published again by the same user.
    publish("site.site-1", sent[0], exchange=topology.exchange)
    assert sites[0].poll(timeout=5)
    reasons = sites[0].rejected
    assert [r.split(":")[0] for r in reasons] == [
        "unsigned",
        "forged or tampered",
        "forged or tampered",
        "message " + model.message_id,
        "replayed",
    ], reasons
    assert "corrupted or tampered with" in reasons[3]
    dead = api(
        "POST",
        f"queues/{quote(topology.federation)}/{quote(topology.dead_queue)}/get",
        {"count": 10, "ackmode": "ack_requeue_true", "encoding": "base64"},
    )
    assert [m["properties"]["headers"]["x-fedrelay-reason"] for m in dead] == reasons
    for party in (coordinator, *sites):
        party.close()


def _send(
    transport: Transport, exchange: str, envelope: ModelEnvelope, payload: bytes | bytearray
) -> None:
    message = Message(
        body=encode_frame(envelope, payload),
        type="model",
        message_id=envelope.message_id,
        correlation_id=envelope.job_id,
        user_id=transport.user,
    )
    transport.publish("site.site-1", message, exchange=exchange)


def test_a_tls_only_federation_logs_in_by_certificate_and_runs_a_job(tmp_path: Path) -> None:
    output, configs = kits(
        tmp_path, tls=True, broker_names=("localhost", "127.0.0.1"), file={"port": free_port()}
    )
    broker = SecondBroker(output / OPERATOR)
    try:
        config = configs["site-1"]
        assert config.broker.tls is not None and config.site("site-1").password is None
        # No plain AMQP: the only listener wants TLS and a certificate.
        plain = config.broker_settings("site-1", None).model_copy(
            update={"tls": None, "reconnect_attempts": 1}
        )
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do
            AmqpTransport(plain)
        # A party that trusts another CA refuses the broker at once, saying why.
        stranger = tmp_path / "other-ca.pem"
        stranger.write_bytes(Authority("other").pem())
        assert config.broker.tls is not None
        tls = config.broker.tls.model_copy(update={"ca": stranger})
        broker_section = config.broker.model_copy(update={"tls": tls})
        distrustful = config.model_copy(update={"broker": broker_section})
        with pytest.raises(TransportError, match="certificate this party does not trust"):
            AmqpTransport(distrustful.broker_settings("site-1", None))
        coordinator, sites = parties(configs)
        job = tiny_job(configs["aggregator"])
        state = coordinator.submit(job, initial_weights(job.model, seed=job.seed))
        run_until([coordinator, *sites], lambda: state.finished)
        assert state.status is Status.DONE, state.reason
        assert set(state.final_metrics) == set(SITES)
        # The model ships with its lineage, every step signed: it verifies offline against
        # the kit's roster.
        save_model(state, tmp_path)
        verdict, _ = audit(tmp_path, Roster.load(output / "site-1" / "roster.json"))
        assert verdict.ok, verdict.problems
        assert verdict.steps == {"initial": 1, "train": 2 * len(SITES), "aggregate": 2, "final": 1}
        for party in (coordinator, *sites):
            party.close()
    finally:
        broker.stop()
