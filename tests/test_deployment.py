"""A federation as deployed: one OS process per site and the aggregator, over real RabbitMQ."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from node.simulate import Federation, SimulationConfig
from relay.workflows.state import Status
from tests.broker import (
    PASSWORD,
    SecondBroker,
    TestBroker,
    federation_header,
    free_port,
    phantom_sites,
    stop_processes,
    write_federation,
)

FEDRELAY = str(Path(sys.executable).parent / "fedrelay")
SITES = ("site-1", "site-2", "site-3")
DATA = {"cases_per_site": 5, "volume_size": 16}
MODEL = {"width": 4, "depth": 3}


@dataclass
class Deployment:
    """Processes of one federation, with their logs."""

    broker: TestBroker
    root: Path
    config: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, party: str) -> None:
        args = ["aggregator", "run"] if party == "aggregator" else ["node", "run", "--site", party]
        log = (self.root / f"{party}.log").open("ab")
        self.processes[party] = subprocess.Popen(
            [FEDRELAY, "-v", *args, "-c", str(self.config)], stdout=log, stderr=log
        )

    def log(self, party: str) -> str:
        return (self.root / f"{party}.log").read_text(errors="replace")

    def submit(self, *args: str, timeout: float = 240) -> str:
        done = subprocess.run(
            [FEDRELAY, "job", "submit", "-c", str(self.config), *args, "--wait"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr + self.log("aggregator")
        return done.stdout.split()[0]

    def submit_in_background(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [FEDRELAY, "job", "submit", "-c", str(self.config), *args, "--wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def result(self, job_id: str) -> dict[str, object]:
        path = self.root / "results" / job_id / "job.json"
        for _ in range(100):
            if path.exists():
                break
            time.sleep(0.1)
        record: dict[str, object] = json.loads(path.read_text())
        return record

    def stop(self) -> None:
        stop_processes(self.processes.values())


def write_config(root: Path, broker: TestBroker) -> Path:
    for party in ("aggregator", *SITES):
        broker.settings(party)  # creates the broker user
    sites = phantom_sites(SITES, root, **DATA, password=PASSWORD)
    return write_federation(root, federation_header("deploy", root, broker) + sites)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    broker = TestBroker()
    deployment = Deployment(broker, root, write_config(root, broker))
    declared = subprocess.run(
        [FEDRELAY, "topology", "declare", "-c", str(deployment.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert declared.returncode == 0, declared.stderr
    for party in ("aggregator", *SITES):
        deployment.start(party)
    try:
        yield deployment
    finally:
        deployment.stop()
        broker.delete()


def job_args(algorithm: str, rounds: int, epochs: int = 1) -> list[str]:
    return [
        "--algorithm",
        algorithm,
        "--rounds",
        str(rounds),
        "--local-epochs",
        str(epochs),
        "--width",
        str(MODEL["width"]),
        "--depth",
        str(MODEL["depth"]),
    ]


def simulated(
    algorithm: str, rounds: int, tmp_path: Path, epochs: int = 1
) -> dict[str, dict[str, float]]:
    config = SimulationConfig(
        algorithm=algorithm, sites=len(SITES), rounds=rounds, local_epochs=epochs, **DATA, **MODEL
    )
    federation = Federation.build(config, tmp_path)
    try:
        state = federation.run(config.job())
    finally:
        federation.close()
    assert state.status is Status.DONE
    return state.final_metrics


@pytest.mark.parametrize(
    ("algorithm", "rounds"), [("fedavg", 2), ("ensemble", 1), ("swt", 1), ("cwt", 2)]
)
def test_site_processes_complete_each_workflow_with_the_simulations_dice(
    deployment: Deployment, algorithm: str, rounds: int, tmp_path: Path
) -> None:
    job_id = deployment.submit(*job_args(algorithm, rounds))
    record = deployment.result(job_id)
    assert record["status"] == "done", record
    final = record["final"]
    assert isinstance(final, dict) and set(final) == set(SITES)
    expected = simulated(algorithm, rounds, tmp_path)
    for site in SITES:
        assert final[site] == pytest.approx(expected[site], abs=1e-4), site


def test_status_shows_queues_consumers_and_no_dead_letters(deployment: Deployment) -> None:
    deadline = time.monotonic() + 30  # the management API's figures lag by up to 5 s
    while True:
        done = subprocess.run(
            [FEDRELAY, "status", "-c", str(deployment.config), "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        if len(status["sites_listening"]) == len(SITES) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status["dead_letters"] == 0
    assert set(status["sites_listening"]) == set(SITES)
    assert {q["name"] for q in status["queues"]} >= {
        "fedrelay.deploy.site.site-1",
        "fedrelay.deploy.aggregator",
    }


def fedrelay_json(*args: str, timeout: float = 120) -> str:
    """The --json output of a fedrelay command that must succeed."""
    done = subprocess.run(
        [FEDRELAY, *args, "--json"], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_watch_follows_a_job_live_and_status_shows_its_round_and_sites(
    deployment: Deployment,
) -> None:
    watch = subprocess.Popen(
        [FEDRELAY, "watch", "-c", str(deployment.config), "--json", "--idle-timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)  # it has caught up on earlier jobs and waits for the next
    job_id = deployment.submit(*job_args("fedavg", 3))
    out, err = watch.communicate(timeout=120)
    assert watch.returncode == 0, out + err
    lines = [json.loads(line) for line in out.splitlines()]
    assert {line["job_id"] for line in lines} == {job_id}
    assert lines[0]["event"] == "job_started"
    opened = [line["round"] for line in lines if line["event"] == "round_opened"]
    assert opened == [0, 1, 2]
    trained = [line for line in lines if line["event"] == "metrics_trained"]
    assert len(trained) == 3 * len(SITES)  # every site, every round, as it happened
    last = lines[-1]
    assert last["status"] == "done" and last["rounds_closed"] == 3
    assert last["sites"] == list(SITES)
    assert all(last["per_site"][site]["trained"] == 3 for site in SITES)
    assert isinstance(last["dice_mean"], float) and last["dice_mean"] > 0

    # Afterwards, status and a second watcher read the same log: nothing was consumed.
    status = json.loads(fedrelay_json("status", "-c", str(deployment.config)))
    newest = status["jobs"][0]
    assert newest["job_id"] == job_id and newest["status"] == "done"
    assert newest["round"] == 2 and newest["steps"] == 3
    assert {s: v["trained"] for s, v in newest["per_site"].items()} == dict.fromkeys(SITES, 3)
    again = fedrelay_json("watch", "-c", str(deployment.config), "--job", job_id).splitlines()
    caught_up = json.loads(again[-1])
    assert caught_up["status"] == "done" and caught_up["dice_mean"] == last["dice_mean"]


def aggregator_state(deployment: Deployment, job_id: str) -> dict[str, Any]:
    """The aggregator's saved state of a job ({} until it is first saved)."""
    path = deployment.root / "spool" / "aggregator" / "jobs" / job_id / "state.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return state


def wait_for_state(
    deployment: Deployment, job_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while not done(state := aggregator_state(deployment, job_id)):
        assert time.monotonic() < deadline, state
        time.sleep(0.01)
    return state


def test_an_aggregator_killed_mid_round_resumes_the_job_in_that_round(
    deployment: Deployment, tmp_path: Path
) -> None:
    submit = deployment.submit_in_background(*job_args("fedavg", 3, epochs=3))
    assert submit.stdout is not None
    job_id = submit.stdout.readline().decode().strip()
    # Killed once round 1 has its first update and before it closes (or, if that moment
    # passes unseen, later in round 1).
    state = wait_for_state(
        deployment, job_id, lambda s: s.get("round") == 1 and len(s["contributors"]) >= 1
    )
    deployment.processes["aggregator"].send_signal(signal.SIGKILL)
    deployment.processes["aggregator"].wait()
    deployment.start("aggregator")
    out, err = submit.communicate(timeout=300)
    assert submit.returncode == 0, out.decode() + err.decode() + deployment.log("aggregator")
    record = deployment.result(job_id)
    assert record["status"] == "done"
    rounds = record["rounds"]
    assert isinstance(rounds, list) and [r["round"] for r in rounds] == [0, 1, 2]
    assert f"aggregator resumes job {job_id} (fedavg) in round {state['round']}" in (
        deployment.log("aggregator")
    )
    # The same model as a run without the crash: nothing lost, nothing counted twice.
    expected = simulated("fedavg", 3, tmp_path, epochs=3)
    final = record["final"]
    assert isinstance(final, dict)
    for site in SITES:
        assert final[site] == pytest.approx(expected[site], abs=1e-4), site


def test_an_operator_cancels_a_job_and_resumes_it_in_the_round_it_stopped(
    deployment: Deployment,
) -> None:
    # Rounds long enough (about 5 s) for the cancel to come in the middle of one.
    submit = deployment.submit_in_background(*job_args("fedavg", 3, epochs=15))
    assert submit.stdout is not None
    job_id = submit.stdout.readline().decode().strip()
    wait_for_state(deployment, job_id, lambda s: s.get("round") == 1)
    config = str(deployment.config)
    cancel = [FEDRELAY, "job", "cancel", "-c", config, job_id, "--reason", "scanner upgrade"]
    assert subprocess.run(cancel, capture_output=True, check=False).returncode == 0
    out, _ = submit.communicate(timeout=120)
    assert submit.returncode == 1
    assert "cancelled by the operator: scanner upgrade" in out.decode()
    stopped = wait_for_state(deployment, job_id, lambda s: s.get("status") == "cancelled")
    assert stopped["round"] >= 1 and len(stopped["rounds"]) == stopped["round"]  # mid-round

    again = [FEDRELAY, "job", "cancel", "-c", config, job_id]
    assert subprocess.run(again, capture_output=True, check=False).returncode == 0
    resume = [FEDRELAY, "job", "resume", "-c", config, job_id, "--wait"]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=240, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr + deployment.log("aggregator")
    assert "job_done" in resumed.stdout
    record = deployment.result(job_id)
    assert record["status"] == "done"
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]  # type: ignore[union-attr]
    assert f"job {job_id} resumed in round {stopped['round']}" in deployment.log("aggregator")
    # The second cancel came when the job was already cancelled: refused, with the reason.
    assert "cancel: job " + job_id + " is already cancelled" in deployment.log("aggregator")


def holds_model(journal: Path) -> bool:
    """Whether a site's journal holds a model it acked and has not finished with."""
    for path in journal.glob("*.json"):
        try:
            if '"kind": "model"' in path.read_text():
                return True
        except FileNotFoundError:  # finished while we looked
            continue
    return False


def test_a_site_killed_mid_training_restarts_and_the_job_completes(
    deployment: Deployment,
) -> None:
    submit = deployment.submit_in_background(*job_args("cwt", 2, epochs=20))
    journal = deployment.root / "spool" / "site-2" / "journal"
    deadline = time.monotonic() + 120
    while not holds_model(journal):
        assert time.monotonic() < deadline, "site-2 never got the token"
        time.sleep(0.02)
    deployment.processes["site-2"].send_signal(signal.SIGKILL)  # mid-training: token acked
    deployment.processes["site-2"].wait()
    deployment.start("site-2")
    out, err = submit.communicate(timeout=300)
    assert submit.returncode == 0, out.decode() + err.decode() + deployment.log("site-2")
    record = deployment.result(out.decode().split()[0])
    assert record["status"] == "done"
    assert "resumes model from site-1" in deployment.log("site-2")
    assert not any(journal.glob("*.json"))


def test_connections_closed_by_the_broker_are_survived(deployment: Deployment) -> None:
    submit = deployment.submit_in_background(*job_args("fedavg", 3, epochs=5))
    time.sleep(3)
    closed = subprocess.run(
        [
            "rabbitmqctl",
            "close_all_connections",
            "--vhost",
            deployment.broker.vhost,
            "fedrelay test: connection loss",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert closed.returncode == 0, closed.stderr
    out, err = submit.communicate(timeout=300)
    assert submit.returncode == 0, out.decode() + err.decode() + deployment.log("aggregator")
    assert deployment.result(out.decode().split()[0])["status"] == "done"
    assert all(p.poll() is None for p in deployment.processes.values())


@pytest.fixture(autouse=True)
def _environment_has_no_overrides() -> None:
    assert not [k for k in os.environ if k.startswith("FEDRELAY_") and k != "FEDRELAY_CONFIG"]


UNITS = Path(__file__).resolve().parents[1] / "deploy" / "systemd"


def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = []
    for name in ("fedrelay-node@.service", "fedrelay-aggregator.service"):
        text = (UNITS / name).read_text()
        for directive in ("ProtectSystem=strict", "NoNewPrivileges=yes", "Type=notify"):
            assert directive in text, (name, directive)
        # verify checks that ExecStart exists: point it at this checkout's fedrelay.
        unit = tmp_path / name.replace("@.", "@site-1.")
        unit.write_text(text.replace("/opt/fedrelay/venv/bin/fedrelay", FEDRELAY))
        units.append(str(unit))
    verified = subprocess.run(
        ["systemd-analyze", "verify", *units], capture_output=True, text=True, check=False
    )
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr


def test_a_node_tells_systemd_it_is_ready_and_that_it_stops(tmp_path: Path) -> None:
    broker = TestBroker()
    node = None
    try:
        config = write_config(tmp_path, broker)
        subprocess.run([FEDRELAY, "topology", "declare", "-c", str(config)], check=True)
        address = tmp_path / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
            systemd.bind(str(address))
            systemd.settimeout(120)
            node = subprocess.Popen(
                [FEDRELAY, "node", "run", "-c", str(config), "--site", "site-1"],
                env=os.environ | {"NOTIFY_SOCKET": str(address)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            ready = systemd.recv(4096).decode()
            assert ready == "READY=1\nSTATUS=serving fedrelay.deploy.site.site-1", ready
            node.send_signal(signal.SIGTERM)
            assert systemd.recv(4096) == b"STOPPING=1"
            assert node.wait(timeout=60) == 0
    finally:
        if node is not None and node.poll() is None:
            node.kill()
        broker.delete()


def test_the_deployment_rabbitmq_conf_sets_every_limit_it_names(tmp_path: Path) -> None:
    source = UNITS.parent / "rabbitmq"
    conf = (source / "rabbitmq.conf").read_text()
    # The same file on ports of its own, beside the machine's broker.
    conf = conf.replace("listeners.tcp.default = 5672", f"listeners.tcp.default = {free_port()}")
    conf = conf.replace("management.tcp.port = 15672", f"management.tcp.port = {free_port()}")
    (tmp_path / "rabbitmq.conf").write_text(conf)
    plugins = (source / "enabled_plugins").read_text().strip().strip("[].")
    broker = SecondBroker(tmp_path, plugins=plugins)
    try:
        assert broker.setting("rabbit", "max_message_size") == "{ok,134217728}"
        assert broker.setting("rabbit", "consumer_timeout") == "{ok,1800000}"
        assert broker.setting("rabbit", "heartbeat") == "{ok,60}"
        assert broker.setting("rabbit", "disk_free_limit") == '{ok,"5GB"}'
        assert broker.setting("rabbit", "vm_memory_high_watermark") == "{ok,0.4}"
    finally:
        broker.stop()
