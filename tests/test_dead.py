"""``fedrelay dead list|show|replay`` on the real broker: a message a site refused is listed
and shown without its payload, and, once its cause is fixed, replayed to the site, which acts
on it; every other dead letter stays, in order."""

from __future__ import annotations

import base64
import json
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from node.cli import main
from node.dead import DeadLetterError, Selector
from node.models import initial_weights
from node.operate import quote
from node.simulate import Federation, SimulationConfig
from relay.codec import Encoding, digest
from relay.envelope import JobSpecEnvelope, LineageEnvelope, ModelEnvelope, UpdateEnvelope
from relay.frame import decode_frame, encode_frame
from relay.jobspec import Algorithm, JobSpec
from relay.transport import Message
from tests.broker import HOST, PASSWORD, TestBroker, api

CHUNK_SIZE = 16 * 1024
"""The tiny UNet's 43 kB payload travels as 3 chunks."""


@dataclass
class Setup:
    """A two-site federation on a fresh vhost, its federation file, and two users for
    replaying: one with the impersonator tag, one without."""

    broker: TestBroker
    federation: Federation
    config: Path
    operator: str
    plain: str
    job: JobSpec
    weights: bytes

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(main, [*args[:2], "-c", str(self.config), *args[2:]])

    def listing(self) -> list[dict[str, Any]]:
        done = self.cli("dead", "list", "--json")
        assert done.exit_code == 0, done.output
        rows: list[dict[str, Any]] = json.loads(done.stdout)["dead_letters"]
        return rows

    def replay(self, selector: str, *options: str, user: str | None = None) -> Result:
        login = ["--user", user or self.operator, "--password", PASSWORD]
        return self.cli("dead", "replay", selector, *login, *options)


def _user(broker: TestBroker, tags: str) -> str:
    """A broker user of its own for this test, with the operator's rights on the vhost."""
    name = f"dead-test-{uuid.uuid4().hex[:8]}"
    api("PUT", f"users/{quote(name)}", {"password": PASSWORD, "tags": tags})
    rights = {"configure": "^$", "write": r"^fedrelay\.sim$", "read": r"^fedrelay\.sim\.dead$"}
    api("PUT", f"permissions/{quote(broker.vhost)}/{quote(name)}", rights)
    return name


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    broker = TestBroker()
    simulation = SimulationConfig(
        algorithm=Algorithm.FEDAVG,
        sites=2,
        rounds=1,
        local_epochs=1,
        cases_per_site=4,
        volume_size=16,
        width=4,
        depth=3,
        chunk_size=CHUNK_SIZE,
    )
    federation = Federation.build(simulation, tmp_path / "spool", connect=broker.connect)
    config = tmp_path / "federation.toml"
    config.write_text(
        f'federation = "sim"\n[broker]\nhost = "{HOST}"\nvhost = "{broker.vhost}"\n'
        "[sites.site-1]\n[sites.site-2]\n"
    )
    job = simulation.job()
    encoding = Encoding(initial_weights(job.model, seed=job.seed))
    for _ in encoding.fill():
        pass
    operator, plain = _user(broker, "impersonator"), _user(broker, "")
    try:
        yield Setup(broker, federation, config, operator, plain, job, bytes(encoding.payload))
    finally:
        federation.close()
        broker.delete()
        for user in (operator, plain):
            api("DELETE", f"users/{quote(user)}")


def _send_as_site_2(setup: Setup, body: bytes) -> str:
    """Something site-2 publishes to site-1 that site-1 refuses (garbage, or unsigned)."""
    message_id = uuid.uuid4().hex
    message = Message(
        body=body, type="model", message_id=message_id, correlation_id="x", user_id="site-2"
    )
    site_2 = setup.federation.sites[1].transport
    site_2.publish("site.site-1", message, exchange=setup.federation.topology.exchange)
    return message_id


def _unsigned(setup: Setup) -> bytes:
    envelope = ModelEnvelope(
        job_id=setup.job.job_id,
        algorithm=Algorithm.FEDAVG,
        sender="site-2",
        recipient="site-1",
        payload_digest=digest(b""),
        payload_size=0,
    )
    return encode_frame(envelope, b"")


def _send_model(setup: Setup, job: JobSpec) -> ModelEnvelope:
    """The aggregator's initial model for ``job`` to site-1, signed (in 3 chunks for the
    setup's job)."""
    return setup.federation.coordinator.outbox.send(
        ModelEnvelope,
        setup.weights,
        chunk_size=job.chunk_size,
        job_id=job.job_id,
        algorithm=job.algorithm,
        recipient="site-1",
    )


def _send_job_spec(setup: Setup, job: JobSpec) -> None:
    """The fix: the job spec the model needs, which site-1 had not been sent."""
    setup.federation.coordinator.outbox.send(
        JobSpecEnvelope,
        job.model_dump_json().encode(),
        chunk_size=job.chunk_size,
        job_id=job.job_id,
        algorithm=job.algorithm,
        recipient="site-1",
    )


def _serve_site_1(setup: Setup, messages: int) -> None:
    site_1 = setup.federation.sites[0]
    for _ in range(messages):
        assert site_1.poll(timeout=5), "site-1 got fewer messages than expected"


def _updates(setup: Setup) -> list[UpdateEnvelope]:
    """The chunks of updates site-1 sent the aggregator, as they sit in its queue (each after
    the lineage step recording it)."""
    transport = setup.federation.coordinator.transport
    queue = setup.federation.topology.aggregator_queue
    found = []
    while (delivery := transport.get(queue, timeout=2)) is not None:
        envelope, _ = decode_frame(delivery.message.body)
        assert isinstance(envelope, UpdateEnvelope | LineageEnvelope)
        if isinstance(envelope, UpdateEnvelope):
            found.append(envelope)
        transport.ack(delivery)
    return found


def test_a_model_for_an_unknown_job_is_listed_shown_and_once_the_job_is_known_replayed(
    setup: Setup, tmp_path: Path
) -> None:
    _send_as_site_2(setup, b"not a fedrelay frame")
    model = _send_model(setup, setup.job)
    unsigned = _send_as_site_2(setup, _unsigned(setup))
    _serve_site_1(setup, 5)
    site_1 = setup.federation.sites[0]
    assert len(site_1.rejected) == 5

    rows = setup.listing()
    assert [row["position"] for row in rows] == [1, 2, 3, 4, 5]
    garbage, chunks, last = rows[0], rows[1:4], rows[4]
    assert garbage["problem"] and garbage["reason"].startswith("message:")
    assert garbage["refused_by"] == "site-1" and garbage["published_by"] == "site-2"
    for index, row in enumerate(chunks):
        assert row["message_id"] == model.message_id
        assert row["amqp_message_id"] == f"{model.message_id}.{index}"
        assert (row["kind"], row["sender"], row["recipient"]) == ("model", "aggregator", "site-1")
        assert (row["job"], row["round"], row["hop"]) == (setup.job.job_id, 0, 0)
        assert row["chunk"] == f"{index + 1}/3" and row["payload_size"] == len(setup.weights)
        assert "is unknown to site 'site-1'" in row["reason"]
        assert (row["refused_by"], row["published_by"]) == ("site-1", "aggregator")
        assert row["queue"] == setup.federation.topology.site_queue("site-1")
        assert row["problem"] is None and row["time"]
    assert last["amqp_message_id"] == unsigned and last["reason"].startswith("unsigned")
    before = [row["amqp_message_id"] for row in rows]

    # Never the weights: not raw, not in hex, not in base64, in what list or show print.
    shown = setup.cli("dead", "show", model.message_id[:8])
    assert shown.exit_code == 0, shown.output
    assert f"job_id: {setup.job.job_id}" in shown.stdout and "signature: " in shown.stdout
    assert "is unknown to site 'site-1'" in shown.stdout
    printed = shown.stdout + setup.cli("dead", "list").stdout
    printed += setup.cli("dead", "list", "--json").stdout
    for start in range(0, len(setup.weights) - 48, 4096):
        piece = setup.weights[start : start + 48]
        for form in (piece.hex(), base64.b64encode(piece).decode(), piece.decode("latin-1")):
            assert form not in printed

    # The payload, only to a file of its own, and whole: all three chunks.
    saved = tmp_path / "payload.bin"
    as_json = setup.cli("dead", "show", "#3", "--json", "--payload", str(saved))
    assert as_json.exit_code == 0, as_json.output
    detail = json.loads(as_json.stdout)
    assert detail["envelope"]["chunk_index"] == 1 and detail["envelope"]["signature"]
    assert detail["message_in_queue"] == [2, 3, 4] and detail["missing_chunks"] == []
    assert detail["payload_digest_matches"] is True
    assert saved.read_bytes() == setup.weights
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    again = setup.cli("dead", "show", "#3", "--payload", str(saved))
    assert again.exit_code != 0 and "exists; name a new file" in again.output

    # Not fixable by replaying: garbage, a position past the end, an unknown id.
    for selector, error in [
        ("1", "does not decode as fedrelay's"),
        ("9", "holds 5 message(s)"),
        ("abcdef12", "no dead letter has a message id starting"),
    ]:
        refused = setup.replay(selector)
        assert refused.exit_code != 0 and error in refused.output, refused.output
    # Only an impersonator may publish as the aggregator; nothing moves meanwhile.
    refused = setup.replay(model.message_id, user=setup.plain)
    assert refused.exit_code != 0 and "impersonator" in refused.output, refused.output
    dry = setup.replay(model.message_id, "--dry-run")
    assert dry.exit_code == 0 and "would replay model" in dry.stdout, dry.output
    assert [row["amqp_message_id"] for row in setup.listing()] == before

    _send_job_spec(setup, setup.job)
    _serve_site_1(setup, 1)
    assert setup.job.job_id in site_1.jobs
    done = setup.replay("#2")
    assert done.exit_code == 0, done.output
    assert f"replayed model {model.message_id}" in done.stdout
    assert "dead letter #2, #3, #4" in done.stdout and "2 dead letter(s) remain" in done.stdout
    _serve_site_1(setup, 3)  # the three chunks: reassembled, trained, the update sent
    assert len(site_1.rejected) == 5
    updates = _updates(setup)
    assert {(u.sender, u.job_id, u.round) for u in updates} == {("site-1", setup.job.job_id, 0)}
    assert [row["amqp_message_id"] for row in setup.listing()] == [before[0], before[4]]


def test_a_replayed_copy_of_a_message_already_handled_is_refused_not_handled_twice(
    setup: Setup,
) -> None:
    sent: list[Message] = []
    transport = setup.federation.coordinator.transport
    publish = transport.publish

    def recording(routing_key: str, message: Message, *, exchange: str) -> None:
        sent.append(message)
        publish(routing_key, message, exchange=exchange)

    transport.publish = recording  # type: ignore[method-assign]
    job = setup.job.model_copy(update={"chunk_size": 1 << 20})  # the model in one message
    _send_as_site_2(setup, _unsigned(setup))
    model = _send_model(setup, job)
    # The same message published twice (say, by a sender retrying): both refused.
    publish("site.site-1", sent[-1], exchange=setup.federation.topology.exchange)
    _serve_site_1(setup, 3)
    assert [row["message_id"] for row in setup.listing()][1:] == [model.message_id] * 2

    _send_job_spec(setup, job)
    _serve_site_1(setup, 1)
    first = setup.replay(model.message_id)
    assert first.exit_code == 0, first.output
    assert "dead letter #2," in first.stdout
    assert "copies of the same message stay in the dead-letter queue: #3" in first.stdout
    _serve_site_1(setup, 1)
    assert len(_updates(setup)) == 1
    # The other copy: the same signed message, handled already; refused as a replay.
    second = setup.replay(model.message_id)
    assert second.exit_code == 0, second.output
    _serve_site_1(setup, 1)
    assert _updates(setup) == []
    rows = setup.listing()
    assert len(rows) == 2 and rows[1]["message_id"] == model.message_id
    assert rows[1]["reason"].startswith("replayed:"), rows[1]["reason"]


def test_a_selector_is_a_position_or_a_message_id_and_anything_else_says_what_is_expected() -> None:
    assert Selector.parse("3") == Selector(position=3)
    assert Selector.parse("#123456") == Selector(position=123456)
    assert Selector.parse("ABCDEF12") == Selector(prefix="abcdef12")
    assert Selector.parse("0123456789abcdef0123456789abcdef.2") == Selector(
        prefix="0123456789abcdef0123456789abcdef", chunk=2
    )
    for bad in ("0", "abc", "site-1", "3.2"):
        with pytest.raises(DeadLetterError):
            Selector.parse(bad)
