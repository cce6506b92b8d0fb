"""``fedrelay report`` for a job run by a deployed aggregator: its job.json and, with the
federation file, its events log, drawn by the same plots as a simulation's results."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node.jobreport import read_job_events
from node.report import HopTime
from relay.envelope import (
    AGGREGATOR,
    EVENTS,
    Detail,
    EnvelopeBase,
    EventEnvelope,
    MetricsEnvelope,
)
from relay.frame import encode_frame
from relay.jobspec import Algorithm
from relay.messaging import sign
from relay.security import Security, generate
from relay.transport import Message
from tests.broker import PASSWORD, TestBroker
from tests.test_deployment import FEDRELAY, SITES, Deployment, job_args, write_config

PNG = b"\x89PNG\r\n\x1a\n"
ROUNDS = 2
DP = ["--dp-clip-norm", "3", "--dp-noise-multiplier", "0.03"]
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
REGIONS = ("dice_wt", "dice_tc", "dice_et", "dice_mean")


@dataclass(frozen=True)
class Finished:
    """A job the deployed federation ran: its folder, its record, and the federation."""

    deployment: Deployment
    folder: Path
    record: dict[str, Any]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDRELAY, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """A FedAvg job with differential privacy, run to its end by an aggregator process and
    one node process per site over the real broker."""
    root = tmp_path_factory.mktemp("report")
    broker = TestBroker()
    deployment = Deployment(broker, root, write_config(root, broker))
    try:
        declared = run("topology", "declare", "-c", str(deployment.config))
        assert declared.returncode == 0, declared.stderr
        for party in ("aggregator", *SITES):
            deployment.start(party)
        job_id = deployment.submit(*job_args("fedavg", ROUNDS), *DP)
        record = deployment.result(job_id)
        assert record["status"] == "done", record
        yield Finished(deployment, root / "results" / job_id, record)
    finally:
        deployment.stop()
        broker.delete()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, from its header; fails on anything else."""
    data = path.read_bytes()
    assert data.startswith(PNG), path
    assert data[12:16] == b"IHDR" and len(data) > 1000, path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def final_row(site: str, metrics: dict[str, float]) -> str:
    return f"| {site} | " + " | ".join(f"{metrics[key]:.3f}" for key in REGIONS) + " |"


def test_a_deployed_jobs_report_with_its_events_has_its_curves_hops_and_privacy(
    finished: Finished, tmp_path: Path
) -> None:
    job_id = finished.folder.name
    made = run("report", str(finished.folder), "-c", str(finished.deployment.config))
    assert made.returncode == 0, made.stderr
    report = Path(made.stdout.strip())
    assert report == finished.folder / "report" / "report.md"
    text = report.read_text()
    assert text.startswith(f"# fedrelay job {job_id}: fedavg, {len(SITES)} sites")
    assert "**done**" in text and "time not known" not in text
    for site, metrics in finished.record["final"].items():
        assert final_row(site, metrics) in text, site
    for image in ("dice", "regions", "traffic", "rounds", "hops", "privacy"):
        assert f"]({image}.png)" in text, image
        width, height = png_size(report.parent / f"{image}.png")
        assert 400 <= width <= 3000 and 300 <= height <= 1500, (image, width, height)
    # Every party's `sent` events say what it published: 2 rounds of global models to 3
    # sites, their 6 updates and the final model to 3 sites, each about the model's size.
    moved = re.search(r"## Traffic: ([0-9.]+) MB moved", text)
    model_mb = (finished.folder / "model.safetensors").stat().st_size / 1e6
    assert moved is not None and 12 * model_mb <= float(moved[1]) + 0.05 <= 20 * model_mb, text
    assert f"{len(SITES) * ROUNDS} hop(s)" in text
    assert "Note:" not in text  # the events log was read, and every event verified
    for site in SITES:
        assert f"| {site} | " in text.split("## Privacy")[1], site
    # The Dice-against-round data: one point per round per site, plus the global curve
    # from the initial model through each round to the final one.
    with (report.parent / "dice.csv").open() as file:
        rows = list(csv.DictReader(file))
    for site in SITES:
        points = [row for row in rows if row["series"] == site]
        assert [(row["x"], row["unit"]) for row in points] == [
            (str(r), "round") for r in range(ROUNDS)
        ], site
    overall = [row for row in rows if row["series"] == "global"]
    assert [float(row["x"]) for row in overall] == [float(r) for r in range(ROUNDS + 1)]
    final_mean = sum(
        finished.record["final"][s]["dice_mean"] * finished.record["final_counts"][s] for s in SITES
    ) / sum(finished.record["final_counts"].values())
    assert float(overall[-1]["dice_mean"]) == pytest.approx(final_mean, abs=1e-6)


def test_without_the_federation_file_the_report_holds_job_json_and_says_curves_need_it(
    finished: Finished, tmp_path: Path
) -> None:
    out = tmp_path / "plain"
    made = run("report", str(finished.folder / "job.json"), "-o", str(out))
    assert made.returncode == 0, made.stderr
    text = (out / "report.md").read_text()
    for site, metrics in finished.record["final"].items():
        assert final_row(site, metrics) in text, site
    assert "per-round Dice curves" in text and "-c <federation file>" in text
    assert "time not known" in text
    assert not (out / "dice.png").exists() and not (out / "dice.csv").exists()
    for image in ("regions", "rounds"):
        png_size(out / f"{image}.png")


def test_an_events_log_that_cannot_be_read_is_named_and_the_report_still_renders(
    finished: Finished, tmp_path: Path
) -> None:
    config = finished.deployment.config
    wrong = tmp_path / "federation.toml"  # the aggregator's password (the first) is wrong
    wrong.write_text(config.read_text().replace(PASSWORD, "not-the-password", 1))
    out = tmp_path / "unread"
    made = run("report", str(finished.folder), "-c", str(wrong), "-o", str(out))
    assert made.returncode == 0, made.stderr
    log = f"fedrelay.{finished.record['job']['federation']}.log"
    assert f"the events log {log} could not be read as 'aggregator'" in made.stderr
    text = (out / "report.md").read_text()
    assert f"the events log {log} could not be read" in text
    assert not (out / "dice.png").exists()
    for site, metrics in finished.record["final"].items():
        assert final_row(site, metrics) in text, site


def test_a_failed_jobs_report_states_the_failure_and_what_there_is(
    finished: Finished, tmp_path: Path
) -> None:
    folder = tmp_path / "failed-job"
    folder.mkdir()
    failed = finished.record | {
        "status": "failed",
        "reason": "round 1: only 1 of 3 sites by the deadline",
        "final": {},
        "final_counts": {},
        "model_file": None,
        "model_sha256": None,
    }
    (folder / "job.json").write_text(json.dumps(failed))
    made = run("report", str(folder))
    assert made.returncode == 0, made.stderr
    text = (folder / "report" / "report.md").read_text()
    assert "**failed**: round 1: only 1 of 3 sites by the deadline" in text
    assert "No final scores" in text
    png_size(folder / "report" / "rounds.png")


def test_a_folder_with_neither_results_nor_job_json_is_refused_naming_both(
    tmp_path: Path,
) -> None:
    made = run("report", str(tmp_path))
    assert made.returncode == 1
    assert f"{tmp_path / 'results.json'}: cannot be read" in made.stderr
    assert "job.json" in made.stderr
    (tmp_path / "job.json").write_text('{"status": "done"}')
    broken = run("report", str(tmp_path))
    assert broken.returncode == 1
    assert f"{tmp_path / 'job.json'}.job: missing" in broken.stderr


def test_only_the_jobs_events_signed_by_their_sender_are_read_from_the_log() -> None:
    roster, identities = generate("fed", [AGGREGATOR, "site-1", "site-2"], encrypt_payloads=False)
    keys = {name: Security(identity, roster) for name, identity in identities.items()}
    job = "job-1"

    def event(sender: str, name: str, job_id: str = job, **detail: Detail) -> EventEnvelope:
        return EventEnvelope(
            job_id=job_id,
            algorithm=Algorithm.FEDAVG,
            sender=sender,
            recipient=EVENTS,
            payload_size=0,
            payload_digest=EMPTY_DIGEST,
            event=name,
            detail=detail,
        )

    def scored(sender: str, round: int) -> MetricsEnvelope:
        return MetricsEnvelope(
            job_id=job,
            algorithm=Algorithm.FEDAVG,
            sender=sender,
            recipient=EVENTS,
            round=round,
            payload_size=0,
            payload_digest=EMPTY_DIGEST,
            stage="received",
            sample_count=2,
            metrics={"dice_mean": 0.5},
        )

    def message(envelope: EnvelopeBase, user: str | None = None) -> Message:
        return Message(
            body=encode_frame(envelope, b""),
            type=str(envelope.kind),
            message_id=envelope.message_id,
            correlation_id=envelope.job_id,
            user_id=user or envelope.sender,
        )

    log = [
        message(sign(event(AGGREGATOR, "job_started", sites="site-1,site-2"), keys[AGGREGATOR])),
        message(sign(scored("site-1", 0), keys["site-1"])),
        message(
            sign(
                event("site-1", "sent", to=AGGREGATOR, round=0, hop=0, seconds=1.5), keys["site-1"]
            )
        ),
        message(sign(scored("site-2", 0), keys["site-1"])),  # signed with another's key
        message(scored("site-2", 1)),  # not signed at all
        message(sign(scored("site-2", 0), keys["site-2"]), user="site-1"),  # published by another
        message(sign(event(AGGREGATOR, "job_started", job_id="job-2"), keys[AGGREGATOR])),
        message(sign(event(AGGREGATOR, "job_finished", status="done"), keys[AGGREGATOR])),
    ]

    def read(on_message: Callable[[Message, int], bool], offset: str | int, _: float | None) -> int:
        assert offset == "first"
        for at, each in enumerate(log):
            if on_message(each, at):
                break
        return len(log)

    events = read_job_events(read, job, security=keys[AGGREGATOR])
    assert [(m.site, m.round) for m in events.metrics] == [("site-1", 0)]
    assert events.hops == [HopTime("site-1", 0, 0, AGGREGATOR, 1.5)]
    assert events.ignored == 3 and events.seen == 4
    assert events.seconds is not None and events.seconds >= 0
