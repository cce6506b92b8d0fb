"""Soak: a deployed federation on a local 3-node RabbitMQ cluster, a broker node stopped mid-job.

    .venv/bin/python bench/cluster.py            # CWT, then FedAvg (about 3 min on 2 cores)
    .venv/bin/python bench/cluster.py --quick    # CWT only
    .venv/bin/python bench/cluster.py --kill     # SIGKILL the node instead of `rabbitmqctl stop`

What it does, as an operator would:

1. starts three scratch RabbitMQ nodes on loopback (``fedrelay-c1@localhost`` … ``-c3``, AMQP
   on 5681-5683, management on 15681-15683, each with ``deploy/rabbitmq/rabbitmq.conf``), and
   joins c2 and c3 to c1 (``stop_app``, ``reset``, ``join_cluster``, ``start_app``);
2. provisions a federation of 3 sites (``fedrelay provision --no-tls``) whose ``[broker]``
   lists all three nodes (``host``/``port`` c1, ``addresses`` c2 and c3), and imports its
   definitions into c1 once the cluster has formed, so that every quorum queue and the events
   log get a member on each node (checked, and printed);
3. starts the aggregator and the sites (``fedrelay aggregator run``, ``fedrelay node run``,
   each from its own kit) and runs each job once on the healthy cluster (the baseline);
4. runs the same job again and, once ``--fault-after`` training steps are done (a third of
   them by default: the next model is then in flight), stops the broker node the parties are
   connected to; the node must be down while the job still has training to do (the figures
   say how many steps were done by then), or the soak fails. The first time that is c1,
   which also leads every quorum queue (they were declared there) and holds the classic
   events queue; the node is started again after the job, and it rejoins before the next
   fault;
5. checks that nothing was lost: the job is done; its lineage verifies and holds each site's
   training step of each round or hop exactly once; the events log shows each step once
   (copies of one message published again after a lost confirm or a nack are counted apart,
   as "re-sent copies"); no dead letters, nothing left in the queues; and the final model's
   digest equals the baseline's (the workflows are deterministic for a seed);
6. prints the figures, and stops and deletes the nodes (also on failure or Ctrl-C).

A party that exits is restarted, as systemd's ``Restart=on-failure`` would, so that the job
can end; but a restart fails the soak: parties must fail over to the next address by
themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import load as load_config
from node.dead import peek
from node.operate import ManagementApi
from node.watch import authentic
from relay.envelope import AGGREGATOR, MetricsEnvelope
from relay.errors import InvalidInput
from relay.lineage import model_digest
from relay.topology import Topology
from relay.transport import Message
from relay.transport.amqp import AmqpTransport
from tests.broker import phantom_sites, stop_processes, write_federation

ROOT = Path(__file__).resolve().parents[1]
FEDRELAY = str(Path(sys.executable).parent / "fedrelay")
FEDERATION = "soak"
VHOST = "fedrelay-soak"
SITES = ("site-1", "site-2", "site-3")
TOPOLOGY = Topology(FEDERATION, SITES)
AMQP_PORT, MANAGEMENT_PORT, DIST_PORT = 5680, 15680, 25680
"""Node i (1-3) listens on these plus i."""
JOB_TIMEOUT_S = 600
REPLICATED = ("quorum", "stream")
"""Queue types with a member on every node; the events queue is classic, on one node."""


class SoakFailed(Exception):
    """A check failed or the cluster did not come up; the message says which."""


def run(*command: str, timeout: float = 120, check: bool = True) -> str:
    """Run a command; its stdout. SoakFailed with its output if it fails and ``check``."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise SoakFailed(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")
    return done.stdout


@dataclass
class BrokerNode:
    """One scratch RabbitMQ node, its files under ``home``."""

    index: int
    home: Path

    @property
    def name(self) -> str:
        return f"fedrelay-c{self.index}@localhost"

    @property
    def port(self) -> int:
        return AMQP_PORT + self.index

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{MANAGEMENT_PORT + self.index}"

    def prepare(self) -> None:
        """Its config: the deployment's rabbitmq.conf on its own ports, in one cluster."""
        self.home.mkdir(parents=True)
        conf = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
        for old, new in (
            ("listeners.tcp.default = 5672", f"listeners.tcp.1 = {self.address}"),
            (
                "management.tcp.port = 15672",
                f"management.tcp.port = {MANAGEMENT_PORT + self.index}\n"
                "management.tcp.ip = 127.0.0.1",
            ),
        ):
            if old not in conf:
                raise SoakFailed(f"deploy/rabbitmq/rabbitmq.conf has no line {old!r}")
            conf = conf.replace(old, new)
        (self.home / "rabbitmq.conf").write_text(conf + "cluster_name = fedrelay-soak\n")
        (self.home / "enabled_plugins").write_text("[rabbitmq_management].\n")

    def environment(self) -> dict[str, str]:
        return os.environ | {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(DIST_PORT + self.index),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self.home / "pid"),
        }

    def start(self) -> None:
        """``rabbitmq-server -detached``; returns at once (see :meth:`await_startup`)."""
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self.environment(),
            cwd=self.home,
            check=True,
            capture_output=True,
        )

    def await_startup(self, timeout: float = 120) -> None:
        # await_startup needs the node to exist; right after -detached it may not yet.
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                ["rabbitmqctl", "-n", self.name, "await_startup", "--timeout", "30"],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise SoakFailed(f"{self.name} did not start: {done.stderr}\n{self.log_tail()}")
            time.sleep(1)

    def ctl(self, *args: str, timeout: float = 120) -> str:
        return run("rabbitmqctl", "-n", self.name, *args, timeout=timeout)

    def pid(self) -> int | None:
        try:
            return int((self.home / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, *, kill: bool = False) -> None:
        """``rabbitmqctl stop`` (a clean shutdown), or SIGKILL to its Erlang VM."""
        pid = self.pid()
        if not kill:
            done = subprocess.run(
                ["rabbitmqctl", "-n", self.name, "stop"],
                capture_output=True,
                timeout=120,
                check=False,
            )
            if done.returncode == 0:
                return
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self) -> str:
        return "".join(p.read_text()[-2000:] for p in (self.home / "log").glob("*.log"))


@dataclass
class Cluster:
    """Three nodes on loopback, clustered."""

    root: Path
    nodes: list[BrokerNode] = field(default_factory=list)
    down: set[int] = field(default_factory=set)
    stopping_s: float = 0.0
    """How long the last node stop took."""

    def start(self) -> None:
        for port in (AMQP_PORT, MANAGEMENT_PORT, DIST_PORT):
            for index in (1, 2, 3):
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port + index)) == 0:
                        raise SoakFailed(
                            f"port {port + index} is taken: a cluster left by an earlier run? "
                            f"`rabbitmqctl -n fedrelay-c{index}@localhost stop`"
                        )
        self.nodes = [BrokerNode(i, self.root / f"c{i}") for i in (1, 2, 3)]
        for node in self.nodes:
            node.prepare()
        for folder in (self.root.parent, self.root):
            folder.chmod(0o755)  # the broker's user must reach its files; kits stay 0700
        if os.geteuid() == 0:  # the broker runs as its own user (Debian's wrapper su's to it)
            run("chown", "-R", "rabbitmq:rabbitmq", str(self.root))
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.await_startup()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("reset")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        running = json.loads(first.ctl("cluster_status", "--formatter", "json"))["running_nodes"]
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise SoakFailed(f"the cluster runs {running}, not the three nodes")

    def alive(self) -> BrokerNode:
        return next(n for n in self.nodes if n.index not in self.down)

    def api(self) -> ManagementApi:
        return ManagementApi(self.alive().management, user="guest", password="guest")

    def queues(self) -> list[dict[str, Any]]:
        """The federation's queues: type, leader, members, online members, messages."""
        listed = self.alive().ctl(
            "list_queues", "-p", VHOST, "name", "type", "leader", "members", "online",
            "messages", "--formatter", "json",
        )  # fmt: skip
        return sorted(json.loads(listed), key=lambda q: str(q["name"]))

    def connected_nodes(self) -> dict[str, str]:
        """The node each party's connection is on (as the management API has it)."""
        deadline = time.monotonic() + 15  # the API lists a connection a moment after it opens
        parties = {AGGREGATOR, *SITES}
        while True:
            found = {
                c["user"]: c["node"]
                for c in self.api().call("GET", "connections")
                if c.get("vhost") == VHOST and c["user"] in parties
            }
            if set(found) >= parties or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def node(self, name: str) -> BrokerNode:
        return next(n for n in self.nodes if n.name == name)

    def stop_node(self, node: BrokerNode, *, kill: bool) -> None:
        began = time.monotonic()
        node.stop(kill=kill)
        self.stopping_s = time.monotonic() - began
        self.down.add(node.index)

    def restart_node(self, node: BrokerNode) -> float:
        """Start ``node`` again; returns when its quorum members are back online."""
        started = time.monotonic()
        node.start()
        node.await_startup()
        self.down.discard(node.index)
        deadline = time.monotonic() + 120
        while any(node.name not in q["online"] for q in self.queues() if q["type"] in REPLICATED):
            if time.monotonic() > deadline:
                raise SoakFailed(f"{node.name} restarted but its queue members are not online")
            time.sleep(1)
        return time.monotonic() - started

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
            pid = node.pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):  # `stop` failed or hung
                    os.kill(pid, signal.SIGKILL)


@dataclass
class Parties:
    """The aggregator's and the sites' processes, each run from its own kit."""

    kits: Path
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    notify: dict[str, socket.socket] = field(default_factory=dict)

    def config(self, party: str) -> Path:
        return self.kits / party / "federation.toml"

    def start(self, party: str) -> None:
        if party == AGGREGATOR:
            args = ["aggregator", "run", "-c", str(self.config(party))]
        else:
            args = ["node", "run", "-c", str(self.config(party)), "--site", party]
        if party not in self.notify:
            # Each party tells "systemd" it is ready, as under its unit (Type=notify).
            self.notify[party] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify[party].bind(str(self.logs / f"{party}.notify"))
        environment = os.environ | {"NOTIFY_SOCKET": str(self.logs / f"{party}.notify")}
        log = (self.logs / f"{party}.log").open("ab")
        self.processes[party] = subprocess.Popen(
            [FEDRELAY, *args], stdout=log, stderr=log, env=environment
        )

    def log(self, party: str) -> str:
        return (self.logs / f"{party}.log").read_text(errors="replace")

    def start_all(self) -> None:
        for party in (AGGREGATOR, *SITES):
            self.start(party)
        for party, notify in self.notify.items():
            notify.settimeout(180)
            try:
                while not notify.recv(4096).startswith(b"READY=1"):
                    pass
            except TimeoutError as e:
                raise SoakFailed(f"{party} did not get ready:\n" + self.tails()) from e

    def supervise(self) -> None:
        """Restart a party that exited, as systemd would (Restart=on-failure)."""
        for party, process in list(self.processes.items()):
            if process.poll() is not None:
                print(f"  ! {party} exited ({process.returncode}); restarting it")
                self.restarts[party] += 1
                self.start(party)

    def tails(self) -> str:
        return "\n".join(f"--- {p}\n{self.log(p)[-3000:]}" for p in self.processes)

    def stop(self) -> None:
        stop_processes(self.processes.values())
        for notify in self.notify.values():
            notify.close()


def federation_file(root: Path, cluster: Cluster, cases: int, volume: int) -> Path:
    """The coordinator's federation file: every node of the cluster, three phantom sites."""
    first, *others = cluster.nodes
    lines = [
        f'federation = "{FEDERATION}"',
        "[broker]",
        'host = "127.0.0.1"',
        f"port = {first.port}",
        f"addresses = [{', '.join(repr(n.address) for n in others)}]",
        f'vhost = "{VHOST}"',
        f'management_url = "{first.management}"',
        "heartbeat_s = 10",
        "[aggregator]",
        f'spool = "{root / "spool" / AGGREGATOR}"',
        f'output = "{root / "results"}"',
    ]
    sites = phantom_sites(SITES, root, cases_per_site=cases, volume_size=volume)
    return write_federation(root, lines + sites)


@dataclass
class JobRun:
    """One job's outcome and what the checks found."""

    algorithm: str
    job_id: str
    seconds: float
    record: dict[str, Any]
    digest: str
    fault: str = ""
    failover: dict[str, str] = field(default_factory=dict)
    steps: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    events: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    resent: int = 0
    lineage_ok: bool = False
    dead_letters: int = 0
    left_in_queues: int = 0


def job_args(algorithm: str, rounds: int, epochs: int) -> list[str]:
    return [
        "--algorithm", algorithm, "--rounds", str(rounds), "--local-epochs", str(epochs),
        "--width", "4", "--depth", "3", "--seed", "0",
    ]  # fmt: skip


def run_job(
    parties: Parties,
    output: Path,
    args: list[str],
    *,
    fault: tuple[int, Callable[[], None]] | None = None,
) -> tuple[str, float, float, int, dict[str, Any]]:
    """Submit a job and wait for its job.json; ``fault`` = (training steps done, action).
    Returns the job's id, its time, the fault's time after the submit, the training steps
    done once the fault's action had returned, and the job's record. A fault whose action
    returns only after the job ended did not land mid-job: that fails the soak."""
    started = time.monotonic()
    submitted = run(FEDRELAY, "job", "submit", "-c", str(parties.config(AGGREGATOR)), *args)
    job_id = submitted.split()[0]
    path = output / job_id / "job.json"
    faulted: threading.Thread | None = None
    at = 0.0
    down: int | None = None  # training steps done once the fault had taken effect
    while not path.exists():
        parties.supervise()
        if fault is not None and faulted is None and steps_done(parties, job_id) >= fault[0]:
            faulted = threading.Thread(target=fault[1])  # the job goes on while it stops
            faulted.start()
            at = time.monotonic() - started
        if faulted is not None and down is None and not faulted.is_alive():
            down = steps_done(parties, job_id)
        if time.monotonic() - started > JOB_TIMEOUT_S:
            raise SoakFailed(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s\n{parties.tails()}")
        time.sleep(0.1)
    seconds = time.monotonic() - started
    if faulted is not None:
        faulted.join()
        if down is None:
            raise SoakFailed(
                f"job {job_id} ended {seconds - at:.1f} s after the fault began, before it had "
                "taken effect: give the job more work (--local-epochs, --rounds)"
            )
    elif fault is not None:
        raise SoakFailed(
            f"job {job_id} was done before {fault[0]} training steps were (the sites' ledgers "
            f"list {steps_done(parties, job_id)})"
        )
    time.sleep(0.2)  # job.json is replaced whole; the model beside it is written first
    return job_id, seconds, at, down or 0, json.loads(path.read_text())


def steps_done(parties: Parties, job_id: str) -> int:
    """Training steps of ``job_id`` the sites have finished (trained and sent on), from the
    ledgers in their spools."""
    done = 0
    for site in SITES:
        ledger = ledger_path(parties.config(site), site)
        with contextlib.suppress(FileNotFoundError):
            lines = ledger.read_text().splitlines()
            done += sum(1 for line in lines if line.startswith(job_id) and "|train|" in line)
    return done


@functools.cache
def ledger_path(config: Path, site: str) -> Path:
    """``site``'s ledger of finished messages (its federation file read once: the poll that
    waits for the fault's moment must keep up with the job)."""
    return load_config(config).site(site).spool / "done.log"


def final_digest(output: Path, job_id: str) -> str:
    return model_digest(load_file(str(output / job_id / "model.safetensors")))


def lineage_steps(output: Path, job_id: str) -> Counter[tuple[str, int, int]]:
    """How many times each site's training step (site, round, hop) is in the lineage."""
    records = json.loads((output / job_id / "lineage.json").read_text())
    return Counter(
        (r["sender"], int(r["round"]), int(r["hop"])) for r in records if r["step"] == "train"
    )


def read_events(config_path: Path) -> list[tuple[Any, Message]]:
    """Every event in the events log, read as the aggregator (authentic ones only)."""
    config = load_config(config_path)
    security = config.party_security(AGGREGATOR)
    transport = AmqpTransport(config.party_settings(AGGREGATOR))
    found: list[tuple[Any, Message]] = []

    def take(message: Message, _offset: int) -> bool:
        with contextlib.suppress(InvalidInput):  # not signed by its sender: not the party's
            found.append((authentic(message, security), message))
        return False

    try:
        transport.read_stream(config.topology().log_queue, take, offset="first", idle_s=3)
    finally:
        transport.close()
    return found


def check(run_: JobRun, events: list[tuple[Any, Message]], cluster: Cluster, expected: int) -> None:
    """Fill in what the events, the lineage and the queues say of ``run_``."""
    copies: Counter[str] = Counter()
    by_step: dict[tuple[str, int, int], set[str]] = defaultdict(set)
    for envelope, message in events:
        if envelope.job_id != run_.job_id or not isinstance(envelope, MetricsEnvelope):
            continue
        if envelope.stage == "trained":
            copies[message.message_id] += 1
            by_step[(envelope.sender, envelope.round, envelope.hop)].add(message.message_id)
    run_.events = Counter({step: len(ids) for step, ids in by_step.items()})
    run_.resent = sum(n - 1 for n in copies.values())
    queues = {q["name"]: q for q in cluster.queues()}
    run_.dead_letters = int(queues[TOPOLOGY.dead_queue]["messages"])
    run_.left_in_queues = sum(
        int(queues[TOPOLOGY.queue_of(party)]["messages"]) for party in (AGGREGATOR, *SITES)
    )
    problems = []
    if run_.record["status"] != "done":
        problems.append(f"status {run_.record['status']}: {run_.record.get('reason')}")
    if len(run_.steps) != expected or set(run_.steps.values()) != {1}:
        problems.append(f"lineage train steps {dict(run_.steps)}, expected {expected} once each")
    if run_.events != Counter(dict.fromkeys(run_.steps, 1)):
        problems.append(f"events log trained steps {dict(run_.events)}")
    if not run_.lineage_ok:
        problems.append("lineage does not verify")
    if run_.dead_letters or run_.left_in_queues:
        letters = peek(cluster.api(), VHOST, TOPOLOGY)
        said = "; ".join(
            f"{row['kind']} {row['sender']}→{row['recipient']} job {str(row['job'])[:8]} round "
            f"{row['round']} chunk {row['chunk']}: {row['reason']}"
            for row in (letter.summary() for letter in letters)
        )
        problems.append(
            f"{run_.dead_letters} dead letters ({said or 'none listed'}), "
            f"{run_.left_in_queues} left in queues"
        )
    if problems:
        raise SoakFailed(f"{run_.algorithm} job {run_.job_id}: " + "; ".join(problems))


def show_queues(cluster: Cluster, title: str) -> None:
    print(f"\n{title}")
    for q in cluster.queues():
        members = ", ".join(m.split("@")[0] for m in q.get("members") or [])
        online = len(q.get("online") or [])
        leader = str(q.get("leader") or "").split("@")[0]
        kind = "classic" if "classic" in q["type"] else q["type"]  # its node down: the module
        print(f"  {q['name']:<32} {kind:<8} leader {leader:<13} members {members} "
              f"({online} online)")  # fmt: skip


def soak(args: argparse.Namespace, root: Path) -> int:
    cluster = Cluster(root / "brokers")
    parties: Parties | None = None
    try:
        began = time.monotonic()
        cluster.start()
        print(f"cluster up: {', '.join(n.name for n in cluster.nodes)} "
              f"({time.monotonic() - began:.0f} s)")  # fmt: skip
        coordinator = federation_file(root, cluster, args.cases, args.volume)
        kits = root / "kits"
        run(FEDRELAY, "provision", str(coordinator), "-o", str(kits), "--no-tls")
        # Declared now that the three nodes run, so each queue gets a member on each (the
        # definitions' import at boot would give them one: deploy/README.md).
        cluster.api().call(
            "POST", "definitions", json.loads((kits / "operator" / "definitions.json").read_text())
        )
        replicated = [q for q in cluster.queues() if q["type"] in REPLICATED]
        show_queues(cluster, "queues (declared through c1):")
        if any(len(q["members"]) != 3 for q in replicated):
            raise SoakFailed("a quorum queue or the events log has fewer than 3 members")
        logs = root / "logs"
        logs.mkdir()
        parties = Parties(kits, logs)
        parties.start_all()
        output = root / "results"
        rows: list[tuple[JobRun, JobRun]] = []
        for algorithm in args.algorithms:
            job = job_args(algorithm, args.rounds, args.local_epochs)
            expected = len(SITES) * args.rounds
            print(f"\n{algorithm}: {len(SITES)} sites, {args.rounds} rounds, "
                  f"{args.local_epochs} local epochs, volume {args.volume}, width 4")  # fmt: skip
            job_id, seconds, _, _, record = run_job(parties, output, job)
            base = JobRun(algorithm, job_id, seconds, record, final_digest(output, job_id))
            print(f"  baseline {job_id[:8]}: {record['status']} in {seconds:.1f} s")
            connected = cluster.connected_nodes()
            target = cluster.node(Counter(connected.values()).most_common(1)[0][0])
            leaders = {str(q["leader"]) for q in cluster.queues() if q["type"] == "quorum"}
            # What an operator runs before taking a node down (the rolling-restart procedure):
            # wait until every quorum queue keeps its quorum without it.
            await_quorum = ("rabbitmq-upgrade", "-n", target.name, "-t", "120")
            run(*await_quorum, "await_online_quorum_plus_one", timeout=180)
            run("rabbitmq-queues", "-n", target.name, "check_if_node_is_quorum_critical")
            what = ["the parties are connected to it"] if connected else []
            if leaders == {target.name}:
                what.append("it leads every quorum queue")
            elif target.name in leaders:
                what.append("it leads some quorum queues")
            fault = functools.partial(cluster.stop_node, target, kill=args.kill)
            after = args.fault_after or max(1, expected // 3)
            job_id, seconds, at, down, record = run_job(parties, output, job, fault=(after, fault))
            faulted = JobRun(algorithm, job_id, seconds, record, final_digest(output, job_id))
            how = "killed" if args.kill else "stopped"
            faulted.fault = (
                f"{target.name} {how} at {at:.1f} s, {after} of {expected} training steps done, "
                f"down with {down} done ({'; '.join(what)})"
            )
            faulted.failover = cluster.connected_nodes()
            print(f"  with fault {job_id[:8]}: {record['status']} in {seconds:.1f} s; "
                  f"{faulted.fault}; stopping took {cluster.stopping_s:.1f} s")  # fmt: skip
            show_queues(cluster, f"  queues with {target.name} down:")
            events = read_events(parties.config(AGGREGATOR))
            for one in (base, faulted):
                one.steps = lineage_steps(output, one.job_id)
                verdict = run(
                    FEDRELAY, "lineage", "verify", str(output / one.job_id / "model.safetensors"),
                    "--roster", str(kits / "roster.json"), "--json", check=False,
                )  # fmt: skip
                one.lineage_ok = bool(json.loads(verdict)["ok"])
                check(one, events, cluster, expected)
            if parties.restarts:
                raise SoakFailed(
                    f"{algorithm}: parties exited and were restarted {dict(parties.restarts)}; "
                    "failover should have kept them going"
                )
            if faulted.digest != base.digest:
                raise SoakFailed(
                    f"{algorithm}: the final model differs from the baseline's "
                    f"({faulted.digest[:12]} vs {base.digest[:12]})"
                )
            rows.append((base, faulted))
            back = cluster.restart_node(target)
            print(f"  {target.name} restarted; its queue members online again in {back:.0f} s")
        report(rows, parties, cluster)
        return 0
    except SoakFailed as e:
        print(f"\nSOAK FAILED: {e}", file=sys.stderr)
        if parties is not None:
            print(parties.tails(), file=sys.stderr)
        return 1
    finally:
        if parties is not None:
            parties.stop()
        cluster.close()


def report(rows: list[tuple[JobRun, JobRun]], parties: Parties, cluster: Cluster) -> None:
    print("\n| job | without fault | with fault | fault | parties then on | train steps "
          "(lineage / events) | re-sent copies | lost | final model |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for base, faulted in rows:
        expected = len(base.steps)
        lost = expected - len(faulted.steps)
        moved = ", ".join(
            f"{party} {node.split('@')[0]}" for party, node in sorted(faulted.failover.items())
        )
        print(
            f"| {faulted.algorithm} | {base.seconds:.1f} s | {faulted.seconds:.1f} s | "
            f"{faulted.fault} | {moved} | {expected} / {sum(faulted.events.values())} | "
            f"{faulted.resent} | {lost} | same digest {faulted.digest[:12]} |"
        )
    failovers = {
        party: [line for line in parties.log(party).splitlines() if "connected to RabbitMQ" in line]
        for party in parties.processes
    }
    print("\nfailover log lines (first per party):")
    for party, lines in failovers.items():
        print(f"  {party}: {lines[0].strip() if lines else '(none)'} [{len(lines)} in all]")
    lost = sum(len(base.steps) - len(faulted.steps) for base, faulted in rows)
    dead = sum(faulted.dead_letters for _, faulted in rows)
    print(f"\nmessages lost: {lost}; dead letters: {dead}; party restarts: 0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CWT only")
    parser.add_argument(
        "--algorithm", action="append", choices=["cwt", "fedavg", "swt"], help="[cwt, fedavg]"
    )
    parser.add_argument("--rounds", type=int, default=3, help="FedAvg rounds / CWT cycles")
    parser.add_argument("--local-epochs", type=int, default=8)
    parser.add_argument("--cases", type=int, default=5, help="phantom cases per site")
    parser.add_argument("--volume", type=int, default=16, help="phantom volume size")
    parser.add_argument(
        "--fault-after", type=int, default=0, help="training steps done before the fault [a third]"
    )
    parser.add_argument("--kill", action="store_true", help="SIGKILL the node's VM")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    args = parser.parse_args()
    args.algorithms = args.algorithm or (["cwt"] if args.quick else ["cwt", "fedavg"])
    if shutil.which("rabbitmq-server") is None:
        print("rabbitmq-server is not on PATH", file=sys.stderr)
        return 1

    def interrupted(number: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {number}")  # so that the nodes are cleaned up

    signal.signal(signal.SIGTERM, interrupted)
    # This script's own connection (it reads the events log) logs its failovers too.
    logging.basicConfig(level=logging.WARNING, format="  (soak reader) %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # each refused connect, at length
    root = Path(tempfile.mkdtemp(prefix="fedrelay-cluster-"))
    try:
        return soak(args, root)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
