"""Fault injection on a deployed federation: real RabbitMQ, one OS process per party.

The harness of ``tests/test_faults.py`` (one trial of each fault, in CI) and
``bench/soak.py`` (many randomized trials). A trial runs a tiny job, injects one fault (a
SIGKILL at a chosen point, connections closed by the broker, a broker restart, a site that
is absent, a full spool disk) and then audits the outcome against a fault-free run of the same
job (:func:`audit`):

- the job is done, or stopped with a clear reason;
- its lineage accounts for every round's update and every ring hop exactly once, back from
  the final model (as saved) to the initial one; nothing is left in a journal or a queue, and
  every dead letter is a refused copy of something that was handled;
- where training is deterministic (fixed seed, and no optimizer state lost in a restart: see
  :class:`Recipe`), the final model is bit for bit the fault-free run's.

A process is killed exactly between two chunks through the node's test hook
(``FEDRELAY_TEST_FREEZE_AT``, :mod:`node.testfreeze`): it stops itself there with SIGSTOP,
and the harness kills it (or fills its disk and lets it go on).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.audit import audit as audit_model
from node.config import load as load_config
from node.dead import list_dead
from node.models import initial_weights
from node.operate import ManagementApi, quote, submit_job
from node.options import JobOptions
from node.testfreeze import FREEZE_ENV
from relay.codec import encode
from relay.errors import TransportError
from relay.jobspec import Algorithm, JobSpec
from relay.journal import SPOOL_HEADROOM
from relay.topology import Topology
from relay.transport.amqp import AmqpTransport, BrokerSettings
from tests.broker import ADMIN, PASSWORD, phantom_sites, stop_processes, write_federation

FEDRELAY = str(Path(sys.executable).parent / "fedrelay")
HOST = "127.0.0.1"
SITES = ("site-1", "site-2", "site-3")
DATA = {"cases_per_site": 5, "volume_size": 16}
HEARTBEAT_S = 10
JOB_TIMEOUT_S = 300.0
"""A job not finished this long after its fault is hung: that is a failure, not a wait."""

BENIGN_DEAD = ("stale", "already trained", "already handled", "which is done", "is over")
"""Reasons of dead letters that refuse a copy of something handled (a ring token sent again
by a site that retrained it after a restart): accounted for, not lost."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message (one chunk) of a job, as ``fedrelay dead list`` shows it."""

    kind: str
    sender: str
    recipient: str
    round: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.sender} -> {self.recipient}: {self.reason}"

    def copy_refused(
        self, *, restarted: Iterable[str], spec: JobSpec, scored: Iterable[str]
    ) -> bool:
        """Whether it is a copy of something handled, refused after a restart: a ring token
        sent again by a site that retrained it; or a final model that the restarted
        aggregator sent again to a site that had scored it (``scored``) and forgotten the
        job, whose chunks before the last are screened out before they can be recognised
        as a copy."""
        restarted = set(restarted)
        if any(word in self.reason for word in BENIGN_DEAD):
            return bool(restarted)
        return (
            "aggregator" in restarted
            and (self.kind, self.sender, self.round) == ("model", "aggregator", spec.rounds)
            and self.recipient in set(scored)
            and f"is unknown to site {self.recipient!r}" in self.reason
        )


def summarized(letters: Sequence[DeadLetter]) -> str:
    """Dead letters as text, each distinct one once with its count (chunks repeat)."""
    counts = Counter(str(letter) for letter in letters)
    return "; ".join(f"{n}x {text}" if n > 1 else text for text, n in counts.items())


class FaultError(AssertionError):
    """The harness could not inject its fault or read the outcome (not a finding)."""


# -- brokers ------------------------------------------------------------------------------


class Broker:
    """A vhost of its own on some RabbitMQ node, with a user per party (password PASSWORD)."""

    def __init__(self, *, port: int, management_port: int) -> None:
        self.port = port
        self.management_url = f"http://{HOST}:{management_port}"
        self.vhost = f"fedrelay-fault-{uuid.uuid4().hex[:10]}"
        self.users: set[str] = set()
        self.api("PUT", f"vhosts/{quote(self.vhost)}", {})
        # The admin reads dead letters through the management API: it needs the vhost.
        self._grant(ADMIN[0])

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One management API call as the admin."""
        return ManagementApi(self.management_url, user=ADMIN[0], password=ADMIN[1]).call(
            method, path, body
        )

    def _grant(self, user: str) -> None:
        rights = {"configure": ".*", "write": ".*", "read": ".*"}
        self.api("PUT", f"permissions/{quote(self.vhost)}/{quote(user)}", rights)

    def add_user(self, user: str) -> None:
        """Create ``user`` with every right on this vhost."""
        if user not in self.users:
            self.api("PUT", f"users/{quote(user)}", {"password": PASSWORD, "tags": ""})
            self._grant(user)
            self.users.add(user)

    def settings(self, user: str) -> BrokerSettings:
        """Connection settings as ``user``."""
        self.add_user(user)
        return BrokerSettings(
            host=HOST,
            port=self.port,
            vhost=self.vhost,
            username=user,
            password=PASSWORD,  # type: ignore[arg-type]  # pydantic takes the str
            heartbeat_s=HEARTBEAT_S,
            reconnect_delay_s=0.2,
        )

    def connections(self) -> list[str]:
        """Names of the connections open on this vhost now."""
        listed = self.api("GET", f"vhosts/{quote(self.vhost)}/connections")
        return [str(c["name"]) for c in listed]

    def close_connection(self, name: str) -> None:
        """Force-close one connection, as an operator does in the management UI."""
        self.api("DELETE", f"connections/{quote(name)}")

    def delete(self) -> None:
        """Remove the vhost with everything in it."""
        self.api("DELETE", f"vhosts/{quote(self.vhost)}")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class ScratchBroker(Broker):
    """A RabbitMQ node of its own, with the management plugin, on free ports: it can be
    restarted mid-job without touching the machine's broker, which others' tests use."""

    def __init__(self) -> None:
        self.node = f"fedrelay-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.home = Path(tempfile.mkdtemp(prefix="fedrelay-fault-broker-"))
        port, management_port = free_port(), free_port()
        conf = f"listeners.tcp.default = {port}\nmanagement.tcp.port = {management_port}\n"
        (self.home / "rabbitmq.conf").write_text(conf)
        (self.home / "enabled_plugins").write_text("[rabbitmq_management].\n")
        self.home.chmod(0o755)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.home)], check=True)
        self.env = os.environ | {
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self.home / "pid"),
        }
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, cwd=self.home)
        try:
            self._await_startup()
            self._await_management(management_port)
            super().__init__(port=port, management_port=management_port)
        except BaseException:
            self.stop()
            raise

    def _ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "--node", self.node, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
        )

    def _await_startup(self) -> None:
        # Right after -detached the node may not exist yet for await_startup.
        deadline = time.monotonic() + 120
        while (started := self._ctl("await_startup", "--timeout", "60")).returncode != 0:
            if time.monotonic() > deadline:
                logs = "".join(p.read_text()[-3000:] for p in (self.home / "log").glob("*.log"))
                raise FaultError(f"scratch RabbitMQ {self.node} did not start: {started} {logs}")
            time.sleep(0.5)

    def _await_management(self, management_port: int) -> None:
        api = ManagementApi(f"http://{HOST}:{management_port}", user=ADMIN[0], password=ADMIN[1])
        deadline = time.monotonic() + 60
        while True:
            try:
                api.call("GET", "overview")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop_app(self) -> None:
        """Stop RabbitMQ on the node (the Erlang VM stays): every connection drops."""
        done = self._ctl("stop_app")
        if done.returncode != 0:
            raise FaultError(f"stop_app: {done.stdout}{done.stderr}")

    def start_app(self) -> None:
        """Start it again and wait until it serves."""
        done = self._ctl("start_app")
        if done.returncode != 0:
            raise FaultError(f"start_app: {done.stdout}{done.stderr}")
        self._await_startup()

    def stop(self) -> None:
        """Stop the node and delete its files."""
        self._ctl("stop", timeout=120)
        shutil.rmtree(self.home, ignore_errors=True)


class SharedBroker(Broker):
    """A fresh vhost on the machine's broker (5672, management on 15672)."""

    def __init__(self) -> None:
        super().__init__(port=5672, management_port=15672)


# -- the job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A tiny job. Models travel in 4 KiB chunks (11 per model), so that a fault can land
    between two chunks of one message.

    ``keep_optimizer_state`` is off by default here: a site keeps Adam's moments between
    rounds only in memory, so a site restarted after it trained once goes on with fresh
    moments and its later models differ from a fault-free run's (see the soak's notes).
    With it off, a restarted site retrains exactly what it trained before, and the final
    model of any trial can be compared bit for bit."""

    algorithm: Algorithm
    rounds: int
    sites: tuple[str, ...] = SITES
    local_epochs: int = 2
    width: int = 4
    depth: int = 3
    chunk_size: int = 4096
    min_sites: int | None = None
    round_timeout_s: float = 600.0
    keep_optimizer_state: bool = False
    seed: int = 0

    def spec(self, federation: str) -> JobSpec:
        """The job spec, with a new job id."""
        options = JobOptions(
            algorithm=self.algorithm,
            rounds=self.rounds,
            local_epochs=self.local_epochs,
            seed=self.seed,
            width=self.width,
            depth=self.depth,
            chunk_size=self.chunk_size,
            min_sites=self.min_sites,
            round_timeout_s=self.round_timeout_s,
        )
        spec = options.job(federation=federation, sites=list(self.sites))
        training = spec.training.model_copy(
            update={"keep_optimizer_state": self.keep_optimizer_state}
        )
        return spec.model_copy(update={"training": training})

    @property
    def model_chunks(self) -> int:
        """Chunks of one model message."""
        spec = self.spec("chunks")
        size = len(encode(initial_weights(spec.model, seed=spec.seed)))
        return math.ceil(size / self.chunk_size)

    def received_models(self, site: str) -> int:
        """Model messages ``site`` receives in a fault-free run (to train, and the final)."""
        if site not in self.sites:
            return 0
        if self.algorithm is Algorithm.FEDAVG:
            return self.rounds + 1
        if self.algorithm.is_ring:
            return self.rounds + 1
        return 2  # ensemble: one to train, the final ensemble

    def sent_models(self, site: str) -> int:
        """Model, update or member messages ``site`` publishes in a fault-free run."""
        return self.rounds if site in self.sites and self.algorithm is not Algorithm.ENSEMBLE else 1

    @property
    def sent_kind(self) -> str:
        """The AMQP type of what a site sends on after training."""
        if self.algorithm is Algorithm.FEDAVG:
            return "update"
        return "model" if self.algorithm.is_ring else "ensemble_member"


# -- a deployment -------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a job left behind, as the aggregator, the spools and the broker tell it."""

    job_id: str
    status: str
    reason: str
    record: dict[str, Any]
    lineage: list[dict[str, Any]]
    final_digest: str | None
    lineage_problems: list[str]
    seconds: float
    dead: list[DeadLetter] = field(default_factory=list)
    """This job's dead letters."""
    leftovers: list[str] = field(default_factory=list)
    """Journal entries not finished, messages left in queues (each one line)."""
    garbage: list[str] = field(default_factory=list)
    """Partial chunk transfers left in spools once the job is over: disk litter, not loss (a
    sender that died mid-message sent it again whole, under a new message id, and a party
    deletes the first copy's chunks when the job ends)."""


class Deployment:
    """A federation file, its topology on ``broker``, and its processes with their logs."""

    def __init__(
        self,
        root: Path,
        broker: Broker,
        sites: Sequence[str] = SITES,
        federation: str = "faults",
        job_timeout_s: float = JOB_TIMEOUT_S,
    ) -> None:
        self.root = root
        self.job_timeout_s = job_timeout_s
        """A job not ended this long after its submission has stalled."""
        self.broker = broker
        self.sites = tuple(sites)
        self.federation = federation
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._notify: dict[str, socket.socket] = {}
        self._litter: set[str] = set()
        # Short: a unix socket's path has at most 107 bytes.
        self._sockets = Path(tempfile.mkdtemp(prefix="fedrelay-notify-"))
        self.config = self._write_config()
        declared = subprocess.run(
            [FEDRELAY, "topology", "declare", "-c", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
        )
        if declared.returncode != 0:
            raise FaultError(f"topology declare: {declared.stdout}{declared.stderr}")
        self.topology = Topology(federation, self.sites)

    def _write_config(self) -> Path:
        for party in ("aggregator", *self.sites):
            self.broker.add_user(party)
        lines = [
            f'federation = "{self.federation}"',
            "[broker]",
            f'host = "{HOST}"',
            f"port = {self.broker.port}",
            f'vhost = "{self.broker.vhost}"',
            f'management_url = "{self.broker.management_url}"',
            f"heartbeat_s = {HEARTBEAT_S}",
            "[aggregator]",
            f'password = "{PASSWORD}"',
            f'spool = "{self.spool("aggregator")}"',
            f'output = "{self.root / "results"}"',
        ]
        sites = phantom_sites(self.sites, self.root, **DATA, password=PASSWORD)
        return write_federation(self.root, lines + sites)

    def spool(self, party: str) -> Path:
        """The party's spool folder."""
        return self.root / "spool" / party

    # -- processes ------------------------------------------------------------------------

    def start(self, party: str) -> None:
        """Start ``party``'s process (``aggregator`` or a site). Its freeze point is read from
        a file (:meth:`freeze`), none until one is set."""
        args = ["aggregator", "run"] if party == "aggregator" else ["node", "run", "--site", party]
        env = os.environ | {FREEZE_ENV: f"@{self._freeze_file(party)}"}
        # The node tells systemd when it serves (READY=1): so it tells the harness.
        old = self._notify.pop(party, None)
        if old is not None:
            old.close()
        address = self._sockets / f"{party}-{uuid.uuid4().hex[:6]}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(address))
        self._notify[party] = notify
        env["NOTIFY_SOCKET"] = str(address)
        with self.log_path(party).open("ab") as log:
            log.write(f"--- harness: start {party}\n".encode())
            log.flush()
            self.processes[party] = subprocess.Popen(
                [FEDRELAY, "-v", *args, "-c", str(self.config)], stdout=log, stderr=log, env=env
            )

    def start_all(self, parties: Iterable[str] | None = None) -> None:
        """Start the parties (default: the aggregator and every site); wait until they serve."""
        chosen = list(parties) if parties is not None else ["aggregator", *self.sites]
        try:
            for party in chosen:
                self.start(party)
            for party in chosen:
                self.wait_serving(party)
        except BaseException:
            self.stop()
            raise

    def _freeze_file(self, party: str) -> Path:
        return self.root / f"freeze-{party}"

    def freeze(self, party: str, point: str | None) -> None:
        """Have ``party`` freeze at ``point`` (``publish|ack:<type>:<n>``, counted from now),
        or nowhere. It goes for the running process and any started later."""
        self._freeze_file(party).write_text(point or "")

    def log_path(self, party: str) -> Path:
        """Where ``party``'s output goes (appended across restarts)."""
        return self.root / f"{party}.log"

    def log(self, party: str) -> str:
        """``party``'s output so far."""
        path = self.log_path(party)
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_serving(self, party: str, timeout: float = 180) -> None:
        """Until the process's latest start says it is ready (it resumed its journal and
        serves its queue)."""
        notify = self._notify[party]
        notify.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if notify.recv(4096).startswith(b"READY=1"):
                    return
            except TimeoutError:
                pass
            process = self.processes[party]
            if process.poll() is not None:
                raise FaultError(f"{party} exited ({process.returncode}): {self.tail(party)}")
            if time.monotonic() > deadline:
                raise FaultError(f"{party} did not start serving: {self.tail(party)}")

    def tail(self, party: str, chars: int = 3000) -> str:
        """The end of ``party``'s log."""
        return self.log(party)[-chars:]

    def alive(self, party: str) -> bool:
        """Whether ``party``'s process runs (frozen counts as running)."""
        process = self.processes.get(party)
        return process is not None and process.poll() is None

    def frozen(self, party: str) -> bool:
        """Whether ``party``'s process stopped itself at its freeze point."""
        process = self.processes.get(party)
        if process is None or process.poll() is not None:
            return False
        try:
            stat = Path(f"/proc/{process.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def wait_frozen(self, party: str, *, until: Callable[[], bool], timeout: float) -> bool:
        """Until ``party`` froze (True), or ``until()`` holds or time is up (False)."""
        deadline = time.monotonic() + timeout
        while not self.frozen(party):
            if until() or time.monotonic() > deadline or not self.alive(party):
                return False
            time.sleep(0.005)
        return True

    def kill(self, party: str) -> None:
        """SIGKILL ``party``'s process and reap it."""
        process = self.processes[party]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def resume(self, party: str) -> None:
        """Let a frozen process go on (SIGCONT)."""
        self.processes[party].send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM every process (each finishes its message in hand), SIGKILL stragglers."""
        stop_processes(self.processes.values())
        for notify in self._notify.values():
            notify.close()
        shutil.rmtree(self._sockets, ignore_errors=True)

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, recipe: Recipe) -> JobSpec:
        """Submit the job as the aggregator's user does (``fedrelay job submit``)."""
        spec = recipe.spec(self.federation)
        transport = AmqpTransport(self.broker.settings("aggregator"))
        try:
            submit_job(transport, self.topology, spec, initial_weights(spec.model, seed=spec.seed))
        finally:
            transport.close()
        return spec

    def result_path(self, job_id: str) -> Path:
        """The aggregator's record of a finished job."""
        return self.root / "results" / job_id / "job.json"

    def finished(self, job_id: str) -> bool:
        """Whether the aggregator has written the job's record (it ended, one way or another)."""
        return self.result_path(job_id).exists()

    def wait_finished(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        expect_running: Iterable[str] = (),
    ) -> str | None:
        """Until the job ended (None), or why it will not: ``timeout`` passed, one of
        ``expect_running`` exited (a crash), or a message of the job was dead-lettered for a
        reason other than being a copy (the job then waits for it forever)."""
        watched = list(expect_running)
        timeout = self.job_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        next_look = time.monotonic() + 2
        while not self.finished(job_id):
            for party in watched:
                if not self.alive(party):
                    return f"{party} exited unexpectedly: {self.tail(party, 1500)}"
            if time.monotonic() > deadline:
                return f"not finished {timeout:g} s after its start"
            if time.monotonic() > next_look:
                next_look = time.monotonic() + 2
                dead = self.dead_letters(job_id)
                if any(not any(w in d.reason for w in BENIGN_DEAD) for d in dead):
                    # A copy may be refused while the job ends normally: give it time.
                    settled = time.monotonic() + 20
                    while time.monotonic() < settled and not self.finished(job_id):
                        time.sleep(0.1)
                    if not self.finished(job_id):
                        return f"stuck: {summarized(self.dead_letters(job_id))}"
            time.sleep(0.05)
        return None

    def job_state(self, job_id: str) -> dict[str, Any]:
        """The aggregator's saved state of a job ({} until it is first saved)."""
        path = self.spool("aggregator") / "jobs" / job_id / "state.json"
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return state

    def wait_round(self, job_id: str, round: int) -> bool:
        """Until the aggregator has opened ``round`` of the job (True), or the job ended."""
        while self.job_state(job_id).get("round", -1) < round:
            if self.finished(job_id):
                return False
            time.sleep(0.01)
        return True

    def dead_letters(self, job_id: str) -> list[DeadLetter]:
        """The job's dead letters."""
        path = f"queues/{quote(self.broker.vhost)}/{quote(self.topology.dead_queue)}"
        if not (self.broker.api("GET", path) or {}).get("messages"):
            return []  # the count lags up to 5 s; list_dead below does not
        return self._read_dead(job_id)

    def _read_dead(self, job_id: str) -> list[DeadLetter]:
        config = load_config(self.config, environ={})
        letters = []
        for letter in list_dead(config, user=ADMIN[0], password=ADMIN[1]):
            row = letter.summary()
            if row.get("job") == job_id:
                fields = (row.get("kind"), row.get("sender"), row.get("recipient"))
                kind, sender, recipient = (str(f) for f in fields)
                round = row.get("round")
                letters.append(
                    DeadLetter(
                        kind,
                        sender,
                        recipient,
                        None if round is None else int(round),
                        letter.reason,
                    )
                )
        return letters

    def queue_depth(self, party: str) -> int:
        """Messages ready in ``party``'s queue, exactly (a passive declare)."""
        transport = AmqpTransport(self.broker.settings("aggregator"))
        try:
            state = transport.queue_state(self.topology.queue_of(party))
        finally:
            transport.close()
        return 0 if state is None else state[0]

    def outcome(
        self, spec: JobSpec, started: float, *, absent: Iterable[str] = (), settle_s: float = 30
    ) -> Outcome:
        """What job ``spec`` left behind, once it ended: its record and lineage, its dead
        letters, and what is left in the present parties' journals and queues."""
        job_id = spec.job_id
        record: dict[str, Any] = json.loads(self.result_path(job_id).read_text())
        seconds = time.monotonic() - started
        folder = self.result_path(job_id).parent
        lineage: list[dict[str, Any]] = []
        problems: list[str] = []
        final_digest = None
        if record["status"] == "done":
            lineage = json.loads((folder / "lineage.json").read_text())
            verdict, _ = audit_model(folder, None)
            # Unprovisioned test federations do not sign: everything but that must hold.
            problems = [p for p in verdict.problems if "could not be checked" not in p]
            finals = [r for r in lineage if r["step"] == "final"]
            final_digest = finals[0]["output"] if len(finals) == 1 else None
        outcome = Outcome(
            job_id,
            record["status"],
            record["reason"],
            record,
            lineage,
            final_digest,
            problems,
            seconds,
        )
        present = [p for p in ("aggregator", *self.sites) if p not in set(absent)]
        deadline = time.monotonic() + settle_s
        while True:
            # The last site finishes its journal entry just after its final metrics went out,
            # and forgets the job (and its unfinished transfers) when it hears the job ended.
            outcome.leftovers = self._leftovers(present)
            litter = {
                f"{party}: partial transfer {path.name}"
                for party in present
                for path in (self.spool(party) / "chunks").glob("*.chunks")
            }
            outcome.garbage = sorted(litter - self._litter)  # this job's
            done = not outcome.leftovers and not outcome.garbage
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self._litter |= litter
        outcome.dead = self._read_dead(job_id)
        return outcome

    def unfinished(self, spec: JobSpec, started: float, why: str) -> Outcome:
        """The outcome of a job that did not end: why, and its dead letters."""
        seconds = time.monotonic() - started
        outcome = Outcome(spec.job_id, "unfinished", why, {}, [], None, [], seconds)
        outcome.dead = self.dead_letters(spec.job_id)
        return outcome

    def _leftovers(self, parties: Sequence[str]) -> list[str]:
        left = []
        for party in parties:
            if not self.alive(party):
                continue  # a stopped party's journal is kept on purpose, to resume
            for path in sorted((self.spool(party) / "journal").glob("*.json")):
                try:
                    envelope = json.loads(path.read_text())["envelope"]
                except (FileNotFoundError, json.JSONDecodeError, KeyError):
                    continue  # finished while we looked
                left.append(f"{party}: journal holds {envelope.get('kind')} {path.name}")
            depth = self.queue_depth(party)
            if depth:
                left.append(f"{party}: {depth} message(s) left in its queue")
        return left


# -- the audit ------------------------------------------------------------------------------


def _by_output(lineage: Sequence[dict[str, Any]], step: str) -> dict[str, dict[str, Any]]:
    return {r["output"]: r for r in lineage if r["step"] == step}


def account(outcome: Outcome, spec: JobSpec, present: Sequence[str]) -> tuple[list[str], int]:
    """Problems with the lineage's accounting of ``outcome``'s rounds or hops, and how many
    train steps are orphans (a model trained, then trained again after a restart).

    FedAvg: each round's aggregate takes exactly one update from each of ``present``, each
    the model of one train step from the previous round's global model. Ensemble: the final
    ensemble has one member per present site, each trained once from the initial model. Ring:
    back from the final model, one train step per hop, in ring order, to the initial model.
    """
    lineage = outcome.lineage
    problems: list[str] = []
    initial = [r for r in lineage if r["step"] == "initial"]
    finals = [r for r in lineage if r["step"] == "final"]
    trains = [r for r in lineage if r["step"] == "train"]
    if len(initial) != 1 or len(finals) != 1:
        return [f"lineage: {len(initial)} initial and {len(finals)} final steps"], 0
    start, final = initial[0]["output"], finals[0]
    trained = _by_output(lineage, "train")
    used: set[str] = set()
    if spec.algorithm is Algorithm.FEDAVG:
        aggregates = [r for r in lineage if r["step"] == "aggregate"]
        if [a["round"] for a in aggregates] != list(range(spec.rounds)):
            problems.append(f"aggregate steps for rounds {[a['round'] for a in aggregates]}")
        rounds = outcome.record["rounds"]
        basis = start
        for index, aggregate in enumerate(aggregates):
            senders = []
            for digest in aggregate["inputs"]:
                step = trained.get(digest)
                if step is None:
                    problems.append(f"round {index}: update {digest[:12]} has no train step")
                    continue
                used.add(digest)
                senders.append(step["sender"])
                if step["inputs"] != [basis] or step["round"] != index:
                    problems.append(
                        f"round {index}: {step['sender']}'s update was not trained from the "
                        "round's global model"
                    )
            if sorted(senders) != sorted(present):
                problems.append(f"round {index}: updates from {sorted(senders)}, not {present}")
            contributors = sorted(rounds[index]["contributors"]) if index < len(rounds) else []
            if contributors != sorted(senders):
                problems.append(f"round {index}: record says {contributors}, lineage {senders}")
            basis = aggregate["output"]
        if final["inputs"] != [basis]:
            problems.append("the final model is not the last round's aggregate")
    elif spec.algorithm is Algorithm.ENSEMBLE:
        senders = []
        for digest in final["inputs"]:
            step = trained.get(digest)
            if step is None or step["inputs"] != [start]:
                problems.append(f"ensemble member {digest[:12]} has no train step from the start")
                continue
            used.add(digest)
            senders.append(step["sender"])
        if sorted(senders) != sorted(present):
            problems.append(f"ensemble members from {sorted(senders)}, not {present}")
    else:
        chain: list[dict[str, Any]] = []
        digest = final["inputs"][0] if len(final["inputs"]) == 1 else None
        while digest is not None and digest != start and len(chain) <= len(trains):
            step = trained.get(digest)
            if step is None:
                problems.append(f"ring: model {digest[:12]} has no train step")
                break
            chain.append(step)
            used.add(digest)
            digest = step["inputs"][0] if len(step["inputs"]) == 1 else None
        chain.reverse()
        ring = list(spec.sites)
        expected = [(ring[k % len(ring)], k // len(ring)) for k in range(spec.rounds * len(ring))]
        got = [(s["sender"], s["round"]) for s in chain]
        if got != expected:
            problems.append(f"ring: hops (site, cycle) {got}, expected {expected}")
    orphans = len([t for t in trains if t["output"] not in used])
    return problems, orphans


@dataclass(frozen=True)
class Problem:
    """Something wrong with a trial's outcome; ``lost``: it means a model, update or record
    was lost or counted twice (not merely that the job stopped, with its reason)."""

    text: str
    lost: bool = True

    def __str__(self) -> str:
        return self.text


def audit(
    outcome: Outcome,
    spec: JobSpec,
    *,
    baseline: Outcome | None,
    present: Sequence[str] | None = None,
    restarted: Iterable[str] = (),
    deterministic: bool = True,
) -> list[Problem]:
    """Everything wrong with ``outcome``: each names something lost, counted twice, left
    behind or different from the fault-free ``baseline``. Empty: the job completed correctly.

    ``present``: the sites that took part (default: all the job's). ``restarted``: parties
    killed and restarted in the trial, which may leave orphan train steps (one retrained
    model each) and refused copies. ``deterministic``: compare final models bit for bit.
    """
    sites = list(present if present is not None else spec.sites)
    restarted = set(restarted)
    problems = [Problem(f"leftover: {left}") for left in outcome.leftovers]
    scored = outcome.record.get("final", {})
    unexplained = [
        letter
        for letter in outcome.dead
        if not letter.copy_refused(restarted=restarted, spec=spec, scored=scored)
    ]
    if unexplained:
        problems.append(Problem(f"dead letters: {summarized(unexplained)}"))
    if outcome.status != "done":
        # Failed or cancelled, the job says why; unfinished, it stalled with nothing saying
        # so: what it was given is unaccounted for.
        stalled = outcome.status == "unfinished"
        return [Problem(f"job {outcome.status}: {outcome.reason}", lost=stalled), *problems]
    problems += [Problem(f"lineage: {p}") for p in outcome.lineage_problems]
    accounting, orphans = account(outcome, spec, sites)
    problems += [Problem(p) for p in accounting]
    killed_sites = restarted - {"aggregator"}
    if orphans > len(killed_sites) * spec.rounds:
        problems.append(Problem(f"{orphans} train step(s) whose model no later step used"))
    finals = sorted(outcome.record["final"])
    if finals != sorted(sites):
        problems.append(Problem(f"final metrics from {finals}, expected {sorted(sites)}"))
    if deterministic and baseline is not None and outcome.final_digest != baseline.final_digest:
        problems.append(
            Problem(
                f"final model {str(outcome.final_digest)[:12]} differs from the fault-free "
                f"run's {str(baseline.final_digest)[:12]}"
            )
        )
    return problems


def run_job(deployment: Deployment, recipe: Recipe) -> tuple[JobSpec, Outcome]:
    """Submit ``recipe``, wait for the end, read the outcome (no fault)."""
    started = time.monotonic()
    spec = deployment.submit(recipe)
    return spec, _finish(deployment, spec, started)


# -- trials -----------------------------------------------------------------------------


@dataclass
class Trial:
    """One fault injected into one job, and what the audit found."""

    kind: str
    point: str
    """Where the fault landed, in words."""
    problems: list[Problem]
    seconds: float
    notes: list[str] = field(default_factory=list)
    reached: bool = True
    """The fault landed where it was aimed (a freeze point can lie past the job's end)."""
    same_model: bool | None = None
    """The final model is bit for bit the fault-free run's (None: the job did not finish)."""

    @property
    def correct(self) -> bool:
        """The job completed and the audit found nothing wrong."""
        return not self.problems

    @property
    def lost(self) -> list[Problem]:
        """Problems that mean something was lost or counted twice."""
        return [p for p in self.problems if p.lost]


class Baselines:
    """Fault-free outcomes, one per recipe, run once on first use."""

    def __init__(self) -> None:
        self._outcomes: dict[Recipe, Outcome] = {}

    def get(self, deployment: Deployment, recipe: Recipe) -> Outcome:
        """The fault-free outcome of ``recipe`` (run now on ``deployment`` if not yet)."""
        if recipe not in self._outcomes:
            spec, outcome = run_job(deployment, recipe)
            problems = audit(outcome, spec, baseline=None)
            if problems:
                raise FaultError(f"the fault-free run of {recipe} went wrong: {problems}")
            self._outcomes[recipe] = outcome
        return self._outcomes[recipe]


def restart_plain(deployment: Deployment, party: str) -> None:
    """Stop ``party`` gracefully if it runs, start it again and wait until it serves."""
    process = deployment.processes.get(party)
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    deployment.start(party)
    deployment.wait_serving(party)


def _finish(
    deployment: Deployment,
    spec: JobSpec,
    started: float,
    *,
    absent: Iterable[str] = (),
) -> Outcome:
    running = [p for p in ("aggregator", *deployment.sites) if p not in set(absent)]
    why = deployment.wait_finished(spec.job_id, expect_running=running)
    if why is not None:
        return deployment.unfinished(spec, started, why)
    return deployment.outcome(spec, started, absent=absent)


def _verdict(
    kind: str,
    point: str,
    outcome: Outcome,
    spec: JobSpec,
    *,
    recipe: Recipe,
    baseline: Outcome,
    restarted: Iterable[str] = (),
    present: Sequence[str] | None = None,
    notes: Iterable[str] = (),
    found: Iterable[Problem] = (),
    reached: bool = True,
) -> Trial:
    """The trial's record: the audit's problems (bit-for-bit comparison unless a restarted
    site lost optimizer state the job keeps), with ``found`` ones added."""
    restarted = set(restarted)
    deterministic = not (recipe.keep_optimizer_state and restarted - {"aggregator"})
    problems = [*found, *(Problem(f"litter: {g}", lost=False) for g in outcome.garbage)]
    problems += audit(
        outcome,
        spec,
        baseline=baseline,
        present=present,
        restarted=restarted,
        deterministic=deterministic,
    )
    same = None if outcome.final_digest is None else outcome.final_digest == baseline.final_digest
    return Trial(kind, point, problems, outcome.seconds, notes, reached, same)


def kill_at(
    deployment: Deployment, recipe: Recipe, baseline: Outcome, *, party: str, point: str, kind: str
) -> Trial:
    """SIGKILL ``party`` exactly at freeze ``point`` (see :mod:`node.testfreeze`), restart
    it, and audit the job."""
    deployment.freeze(party, point)
    started = time.monotonic()
    spec = deployment.submit(recipe)
    reached = deployment.wait_frozen(
        party, until=lambda: deployment.finished(spec.job_id), timeout=deployment.job_timeout_s
    )
    deployment.freeze(party, None)
    if reached:
        deployment.kill(party)
        deployment.start(party)
    outcome = _finish(deployment, spec, started)
    restarted = {party} if reached else set()
    where = f"{party} at {point}" if reached else f"{party}: {point} never reached"
    return _verdict(
        kind,
        where,
        outcome,
        spec,
        recipe=recipe,
        baseline=baseline,
        restarted=restarted,
        reached=reached,
    )


def _models_to_train(journal: Path) -> set[str]:
    names = set()
    for path in journal.glob("*.json"):
        try:
            envelope = json.loads(path.read_text())["envelope"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            continue  # being written, or finished while we looked
        if envelope.get("kind") == "model" and envelope.get("task", "train") == "train":
            names.add(path.name)
    return names


def kill_while_training(
    deployment: Deployment,
    recipe: Recipe,
    baseline: Outcome,
    *,
    site: str,
    visit: int,
    delay_s: float,
) -> Trial:
    """SIGKILL ``site`` ``delay_s`` after its ``visit``-th model to train was journalled
    (acked: it trains, then publishes), restart it, and audit the job."""
    started = time.monotonic()
    spec = deployment.submit(recipe)
    journal = deployment.spool(site) / "journal"
    seen: set[str] = set()
    while len(seen) < visit and not deployment.finished(spec.job_id):
        seen |= _models_to_train(journal)
        time.sleep(0.002)
    point = f"{site}: never got model {visit} to train"
    restarted: set[str] = set()
    busy = False
    if len(seen) >= visit:
        time.sleep(delay_s)
        busy = bool(_models_to_train(journal))
        deployment.kill(site)
        deployment.start(site)
        restarted.add(site)
        state = "training or publishing it" if busy else "after finishing it"
        point = f"{site}: {delay_s:.2f} s into model {visit}, {state}"
    outcome = _finish(deployment, spec, started)
    kind = "site killed while training"
    return _verdict(
        kind,
        point,
        outcome,
        spec,
        recipe=recipe,
        baseline=baseline,
        restarted=restarted,
        reached=busy,  # killed while the model was in its journal: training or publishing
    )


def close_connections(
    deployment: Deployment,
    recipe: Recipe,
    baseline: Outcome,
    *,
    at_s: Sequence[float],
    choose: Callable[[list[str]], list[str]],
    after_round: int = 0,
) -> Trial:
    """At each of ``at_s`` seconds after the aggregator opened round ``after_round``,
    force-close the connections that ``choose`` picks from those open on the vhost
    (management API DELETE, as an operator does), and audit."""
    started = time.monotonic()
    spec = deployment.submit(recipe)
    deployment.wait_round(spec.job_id, after_round)
    opened = time.monotonic()
    closed = 0
    for at in at_s:
        time.sleep(max(0.0, opened + at - time.monotonic()))
        if deployment.finished(spec.job_id):
            break
        for name in choose(deployment.broker.connections()):
            try:
                deployment.broker.close_connection(name)
                closed += 1
            except TransportError:
                pass  # it closed by itself meanwhile
    outcome = _finish(deployment, spec, started)
    times = ", ".join(f"{t:.1f}" for t in at_s)
    point = f"{closed} connection(s) closed {times} s into round {after_round}"
    kind = "connections force-closed"
    return _verdict(
        kind, point, outcome, spec, recipe=recipe, baseline=baseline, reached=closed > 0
    )


def restart_broker(
    deployment: Deployment,
    recipe: Recipe,
    baseline: Outcome,
    *,
    after_s: float,
    down_s: float,
    after_round: int = 0,
) -> Trial:
    """``after_s`` after the aggregator opened round ``after_round``, stop RabbitMQ
    (``stop_app``) for ``down_s``, start it again, and audit. ``deployment`` must be on a
    :class:`ScratchBroker`."""
    broker = deployment.broker
    if not isinstance(broker, ScratchBroker):
        raise FaultError("a broker restart needs a ScratchBroker, never the shared broker")
    started = time.monotonic()
    spec = deployment.submit(recipe)
    deployment.wait_round(spec.job_id, after_round)
    time.sleep(after_s)
    finished = deployment.finished(spec.job_id)
    broker.stop_app()
    time.sleep(down_s)
    broker.start_app()
    outcome = _finish(deployment, spec, started)
    state = "after the job ended" if finished else "mid-job"
    point = f"stop_app {after_s:.1f} s into round {after_round} ({state}), down {down_s:.1f} s"
    kind = "broker restarted"
    return _verdict(
        kind, point, outcome, spec, recipe=recipe, baseline=baseline, reached=not finished
    )


def absent_from_fedavg(
    deployment: Deployment, recipe: Recipe, baseline: Outcome, *, site: str
) -> Trial:
    """``site`` is down for the whole FedAvg job (``recipe`` has a quorum without it and a
    round deadline): the job must complete with the others and record the absence.
    ``baseline``: a fault-free job of the other sites only. Afterwards the absent site's
    queue, which holds the job's messages for it, is purged and the site started again."""
    process = deployment.processes.get(site)
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    others = [s for s in recipe.sites if s != site]
    started = time.monotonic()
    spec = deployment.submit(recipe)
    outcome = _finish(deployment, spec, started, absent={site})
    problems: list[Problem] = []
    for record in outcome.record["rounds"]:
        if record["missing"] != [site]:
            problems.append(Problem(f"round {record['round']}: missing {record['missing']}"))
    if not any(site in note and "final metrics missing" in note for note in outcome.record["late"]):
        problems.append(Problem(f"the record does not say {site}'s final metrics are missing"))
    waiting = deployment.queue_depth(site)
    deployment.broker.api(
        "DELETE",
        f"queues/{quote(deployment.broker.vhost)}/{quote(deployment.topology.site_queue(site))}"
        "/contents",
    )
    restart_plain(deployment, site)
    point = f"{site} down throughout; {waiting} message(s) for it waited in its queue"
    kind = "site never comes back (FedAvg)"
    return _verdict(
        kind, point, outcome, spec, recipe=recipe, baseline=baseline, present=others, found=problems
    )


def absent_from_ring(
    deployment: Deployment, recipe: Recipe, baseline: Outcome, *, site: str, back_after_s: float
) -> Trial:
    """``site`` is down when the ring's token reaches it: the token waits in its durable
    queue; ``back_after_s`` later the site starts, takes it, and the job completes."""
    process = deployment.processes.get(site)
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    started = time.monotonic()
    spec = deployment.submit(recipe)
    token = 1 + recipe.model_chunks  # its job spec, then the token's chunks
    while deployment.queue_depth(site) < token:
        if time.monotonic() - started > deployment.job_timeout_s or deployment.finished(
            spec.job_id
        ):
            raise FaultError(f"the token never reached {site}'s queue")
        time.sleep(0.05)
    time.sleep(back_after_s)
    waited = deployment.queue_depth(site)
    deployment.start(site)
    outcome = _finish(deployment, spec, started)
    point = f"{site} down until {back_after_s:.1f} s after the token reached its queue ({waited})"
    return _verdict(
        "ring site absent, then back", point, outcome, spec, recipe=recipe, baseline=baseline
    )


def fill_spool(
    deployment: Deployment,
    recipe: Recipe,
    baseline: Outcome,
    *,
    site: str,
    point: str,
    mount: Path,
) -> Trial:
    """Freeze ``site`` at ``point`` (receiving), fill the disk of its spool (a small tmpfs at
    ``mount``) and let it go on: it must stop with a reason naming the spool and its disk,
    keep what it received, and, restarted once space is freed, finish the job."""
    deployment.freeze(site, point)
    started = time.monotonic()
    spec = deployment.submit(recipe)
    reached = deployment.wait_frozen(
        site, until=lambda: deployment.finished(spec.job_id), timeout=deployment.job_timeout_s
    )
    deployment.freeze(site, None)
    problems: list[Problem] = []
    notes: list[str] = []
    if reached:
        filler = disk_filler(mount, leave=SPOOL_HEADROOM // 2)
        deployment.resume(site)
        process = deployment.processes[site]
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
            problems.append(Problem(f"{site} went on with a full spool disk", lost=False))
        said = deployment.log(site).rsplit("--- harness: start", 1)[-1]
        reason = f"spool {deployment.spool(site)}:"
        if code == 0 or reason not in said or f"disk mounted at {mount}" not in said:
            problems.append(
                Problem(f"{site} stopped ({code}) without naming its spool's disk", lost=False)
            )
        held = deployment.queue_depth(site)
        transfers = len(list((deployment.spool(site) / "chunks").glob("*.chunks")))
        journal = len(list((deployment.spool(site) / "journal").glob("*.json")))
        notes.append(
            f"stopped with {held} message(s) in its queue, {transfers} partial transfer(s) "
            f"and {journal} journal entr(ies) in its spool"
        )
        filler.unlink()
        if code is None:
            deployment.kill(site)
        deployment.start(site)
    outcome = _finish(deployment, spec, started)
    where = f"{site}'s disk filled at {point}" if reached else f"{point} never reached"
    return _verdict(
        "spool disk full",
        where,
        outcome,
        spec,
        recipe=recipe,
        baseline=baseline,
        restarted={site} if reached else set(),
        notes=notes,
        found=problems,
        reached=reached,
    )


def disk_filler(mount: Path, leave: int) -> Path:
    """Fill the filesystem at ``mount`` until ``leave`` bytes or fewer are free."""
    filler = mount / "filler"
    stat = os.statvfs(mount)
    size = max(0, stat.f_bavail * stat.f_frsize - leave)
    with filler.open("wb") as f:
        block = b"\0" * (1 << 20)
        while size > 0:
            try:
                size -= f.write(block[: min(size, len(block))])
            except OSError:
                break
    return filler


def mount_tmpfs(path: Path, size_bytes: int) -> None:
    """A tmpfs of ``size_bytes`` at ``path`` (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "fedrelay-fault", str(path)],
        check=True,
    )


def unmount(path: Path) -> None:
    """Unmount ``path`` (lazily, so a straggler's open file does not stop it)."""
    subprocess.run(["umount", "-l", str(path)], check=False)
