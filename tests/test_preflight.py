"""``fedrelay preflight``: at one site (its login, rights, data, device, disk) and across a
running federation (a probe each node answers), against the real broker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from node.cli import main
from node.preflight import Report, collect_answers, compare
from node.site import SiteNode
from relay.envelope import AGGREGATOR, EVENTS, Command, ControlEnvelope, EventEnvelope
from relay.jobspec import DEFAULT_CHUNK_SIZE, Algorithm
from relay.messaging import Outbox
from relay.security import Security, generate
from relay.topology import Topology
from relay.transport.memory import MemoryBroker, MemoryTransport
from tests.broker import PASSWORD, TestBroker, federation_header
from tests.test_data import write_msd

FEDRELAY = str(Path(sys.executable).parent / "fedrelay")
SITES = ("site-1", "site-2", "site-3")
LOCKED_OUT = "site-3"
"""The site whose file holds a wrong password: its node cannot log in."""


@dataclass
class Federation:
    """A federation file on a fresh vhost, its topology declared."""

    broker: TestBroker
    root: Path
    config: Path

    def file(self, name: str, *, site_1_data: list[str] | None = None) -> Path:
        """Another federation file on the same vhost, site-1 reading other data."""
        path = self.root / name
        path.write_text(federation_file(self.root, self.broker, site_1_data=site_1_data))
        return path


def federation_file(root: Path, broker: TestBroker, *, site_1_data: list[str] | None) -> str:
    lines = federation_header("preflight", root, broker)
    for index, site in enumerate(SITES):
        password = "wrong-password" if site == LOCKED_OUT else PASSWORD
        data = [
            f"index = {index}",
            f"of = {len(SITES)}",
            "cases_per_site = 4",
            "volume_size = 16",
        ]
        lines += [
            f"[sites.{site}]",
            f'password = "{password}"',
            f'spool = "{root / "spool" / site}"',
            f"[sites.{site}.data]",
            *(site_1_data if site == "site-1" and site_1_data else data),
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("preflight")
    broker = TestBroker()
    for party in ("aggregator", *SITES):
        broker.settings(party)  # the broker user, with the test password
    config = root / "federation.toml"
    config.write_text(federation_file(root, broker, site_1_data=None))
    aggregator = broker.connect(AGGREGATOR)
    aggregator.declare(Topology("preflight", SITES))
    aggregator.close()
    try:
        yield Federation(broker, root, config)
    finally:
        broker.delete()


def preflight(*args: str) -> tuple[int, str]:
    """Run ``fedrelay preflight`` in this process; its exit code and standard output."""
    result = CliRunner().invoke(main, ["preflight", *args], env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


def checks(report: dict[str, Any], site: str) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in report["checks"] if c["site"] == site}


def test_a_good_site_passes_every_check(federation: Federation) -> None:
    code, out = preflight("-c", str(federation.config), "--site", "site-1", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"], out
    found = checks(report, "site-1")
    for check in ("login", "queue", "read", "publish", "data", "device", "disk"):
        assert found[check]["status"] == "ok", found[check]
    assert found["keys"]["status"] == "warn"  # this file has no [security]: said, not failed
    facts = report["sites"]["site-1"]["facts"]
    assert facts["data"] == "phantom" and facts["cases"] >= 3
    assert facts["modalities"] == 4 and facts["regions"] == "wt,tc,et"
    assert facts["spacing_mm"] == "1x1x1" and facts["shape_min"] == facts["shape_max"] == "16x16x16"
    assert facts["device"] in ("cpu", "cuda") and facts["torch_threads"] >= 1
    assert facts["spool_writable"] and facts["disk_free_bytes"] > facts["disk_need_bytes"]


def test_a_site_whose_cases_hold_an_unknown_label_is_named_with_the_case_and_label(
    federation: Federation, tmp_path: Path
) -> None:
    folder = write_msd(tmp_path / "msd", 3, labels=(1, 2, 4))  # 4 is brats's, not msd's
    config = federation.file(
        "unknown-label.toml", site_1_data=['kind = "msd"', f'path = "{folder}"']
    )
    code, out = preflight("-c", str(config), "--site", "site-1", "--json")
    assert code == 1, out
    data = checks(json.loads(out), "site-1")["data"]
    assert data["status"] == "fail"
    assert "case BRATS_000: label values [4] are not msd labels" in data["detail"]
    assert "relabel" in data["fix"] and "kind" in data["fix"]
    code, out = preflight("-c", str(config), "--site", "site-1")  # the table, for a person
    assert code == 1 and "preflight: failed: site-1 data" in out, out


def test_a_site_with_wrong_credentials_is_named_with_the_fix(federation: Federation) -> None:
    code, out = preflight("-c", str(federation.config), "--site", LOCKED_OUT, "--json")
    assert code == 1, out
    report = json.loads(out)
    assert report["failed"] == [f"{LOCKED_OUT}: login"]
    login = checks(report, LOCKED_OUT)["login"]
    assert "credentials wrong" in login["detail"] and f"user '{LOCKED_OUT}'" in login["detail"]
    assert f"password in [sites.{LOCKED_OUT}]" in login["fix"]
    assert "FEDRELAY_SITES__SITE_3__PASSWORD" in login["fix"]
    # What does not need the broker is still checked.
    assert checks(report, LOCKED_OUT)["data"]["status"] == "ok"


def start_node(federation: Federation, site: str) -> subprocess.Popen[bytes]:
    log = (federation.root / f"{site}.log").open("ab")
    return subprocess.Popen(
        [FEDRELAY, "-v", "node", "run", "-c", str(federation.config), "--site", site],
        stdout=log,
        stderr=log,
    )


def test_the_federation_preflight_names_the_site_whose_node_is_not_running(
    federation: Federation,
) -> None:
    nodes = {site: start_node(federation, site) for site in SITES}
    try:
        # site-3's node cannot log in and exits; the others serve their queues.
        assert nodes[LOCKED_OUT].wait(timeout=120) != 0
        assert "refused user 'site-3'" in (federation.root / "site-3.log").read_text()
        deadline = time.monotonic() + 120  # the management API omits consumers at first
        while any(
            not federation.broker.queue(f"fedrelay.preflight.site.{s}").get("consumers")
            for s in ("site-1", "site-2")
        ):
            assert time.monotonic() < deadline, "the site nodes never consumed their queues"
            assert all(nodes[s].poll() is None for s in ("site-1", "site-2"))
            time.sleep(0.5)
        code, out = preflight("-c", str(federation.config), "--json", "--timeout", "5")
    finally:
        for node in nodes.values():
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in nodes.values():
            node.wait(timeout=60)
    assert code == 1, out
    report = json.loads(out)
    assert report["scope"] == "federation" and report["probe"].startswith("preflight-")
    for site in ("site-1", "site-2"):
        entry = report["sites"][site]
        assert entry["reachable"] and entry["consumers"] == 1
        assert entry["facts"]["site"] == site and entry["facts"]["cases"] >= 3
        assert entry["facts"]["regions"] == "wt,tc,et"
        assert checks(report, site)["data"]["status"] == "ok"
    assert report["sites"][LOCKED_OUT]["reachable"] is False
    assert report["failed"] == [f"{LOCKED_OUT}: reachable"]
    silent = checks(report, LOCKED_OUT)["reachable"]
    assert "no node consuming its queue" in silent["detail"]
    assert f"fedrelay preflight -c <its file> --site {LOCKED_OUT}" in silent["fix"]
    assert f"journalctl -u fedrelay-node@{LOCKED_OUT}" in silent["fix"]
    # The two that answered agree on their data.
    across = checks(report, "federation")
    assert all(across[c]["status"] == "ok" for c in ("modalities", "labels", "spacing", "shape"))


def test_sites_whose_data_differs_from_the_others_are_named() -> None:
    like = {
        "data": "msd",
        "modalities": 4,
        "regions": "wt,tc,et",
        "spacing_mm": "1x1x1",
        "shape_min": "120x140x110",
        "shape_max": "140x170x130",
    }
    report = Report("f", "federation")
    compare(
        report,
        {
            "site-1": like,
            "site-2": like | {"regions": "wt,tc"},
            "site-3": like | {"spacing_mm": "0.5x0.5x0.5"},
            "site-4": like,
        },
    )
    found = {(c.site, c.check): c for c in report.checks}
    spacing = found[("site-3", "spacing")]
    assert spacing.status == "warn"
    assert (
        spacing.detail == "site-3: spacing 0.5x0.5x0.5 mm, others (site-1, site-2, site-4) 1x1x1 mm"
    )
    assert spacing.fix.startswith("resample site-3's cases to 1x1x1 mm")
    labels = found[("site-2", "labels")]
    assert labels.status == "fail" and "tumour regions wt,tc, others" in labels.detail
    assert found[("federation", "modalities")].status == "ok"
    assert not report.ok


def test_a_node_answers_only_the_aggregators_signed_probe_and_forged_answers_are_ignored(
    tmp_path: Path,
) -> None:
    roster, identities = generate("probe", [AGGREGATOR, "site-1", "site-2"], encrypt_payloads=True)
    keys = {name: Security(identity, roster) for name, identity in identities.items()}
    broker = MemoryBroker()
    topology = Topology("probe", ("site-1", "site-2"))
    aggregator = MemoryTransport(broker, user=AGGREGATOR)
    aggregator.declare(topology)

    def no_jobs(_: object) -> Any:
        raise AssertionError("a probe needs no job")

    node = SiteNode(
        name="site-1",
        algo_factory=no_jobs,
        transport=MemoryTransport(broker, user="site-1"),
        topology=topology,
        spool=tmp_path,
        security=keys["site-1"],
        describe=lambda: {"site": "site-1", "cases": 3},
    )

    def send(user: str, make: Any, security: Security | None, **fields: Any) -> None:
        outbox = Outbox(
            MemoryTransport(broker, user=user), topology, sender=user, security=security
        )
        outbox.send(make, chunk_size=DEFAULT_CHUNK_SIZE, job_id="preflight-0123456789ab", **fields)

    probe = {"algorithm": Algorithm.FEDAVG, "recipient": "site-1", "command": Command.PROBE}
    send(AGGREGATOR, ControlEnvelope, None, **probe)
    assert node.poll(timeout=1.0) and "unsigned" in node.rejected[-1]
    send("site-2", ControlEnvelope, keys["site-2"], **probe)
    assert node.poll(timeout=1.0) and "a probe comes from the aggregator" in node.rejected[-1]
    send(AGGREGATOR, ControlEnvelope, keys[AGGREGATOR], **probe)  # sealed for site-1, too
    assert node.poll(timeout=1.0) and len(node.rejected) == 2
    # An unsigned answer (anyone holding site-2's broker password could send it) is not taken.
    send("site-2", EventEnvelope, None, recipient=EVENTS, event="preflight", detail={"cases": 9})
    answers = collect_answers(
        aggregator,
        topology,
        "preflight-0123456789ab",
        {"site-1", "site-2"},
        timeout_s=1.0,
        security=keys[AGGREGATOR],
    )
    assert {site: facts for site, (facts, _) in answers.items()} == {
        "site-1": {"site": "site-1", "cases": 3}
    }
