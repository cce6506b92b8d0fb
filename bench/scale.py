"""Benchmark: federations of 5 to 50 sites over RabbitMQ: round time and aggregator memory.

    .venv/bin/python bench/scale.py                  # 5, 10, 25 and 50 sites (~6 min, 2 cores)
    .venv/bin/python bench/scale.py --quick          # 5 and 10 sites (under 2 min)
    .venv/bin/python bench/scale.py --sites 5,50 --rounds 3

Every party is real and talks through the broker, as deployed: a fresh vhost per federation
size (deleted afterwards), one broker user, connection, spool and key pair per party, every
envelope signed and verified. The aggregator runs ``fedrelay aggregator run``'s code in a
process of its own, a fresh one per job, so its peak RSS (VmHWM) is that job's. The sites are
real :class:`~node.site.SiteNode` s hosted as threads in ``--site-processes`` processes, with
a stand-in trainer that adds a per-site constant to every weight: 50 processes each importing
torch and MONAI (about 400 MB and seconds of CPU apiece) would not fit 2 cores, and what is
measured here is the broker and the aggregator, not training. The sites' spools are on
/dev/shm: deployed, each site writes its own disk in parallel with the others; here 50 sites
would share one, and the rounds would be charged for their fsyncs queueing on it. The
aggregator's spool is on disk, as deployed.

Jobs, at each size N:

- ``mean``: FedAvg, weighted mean, with a tiny model (UNet width 4 depth 2, 12 KB) and with a
  5.4 MB one (UNet width 24 depth 4): round time (median of the rounds after the first, which
  includes the sites' first look at the job), aggregator CPU and state-save time per round.
- ``median``: FedAvg with the coordinate-wise median, 5.4 MB model: it needs every update of
  a round at once.
- ``cwt``: one CWT cycle with each model: cycle time and time per site visit.

For each job: the aggregator's peak RSS above its idle RSS (measured before the job), in MiB
and in units of the model's size. A FedAvg aggregator holding every update would grow by
about N model sizes; a streaming one stays flat. Since every site's "training" adds a known
constant, every job's final model is known exactly and checked: nothing lost or counted
twice, at any N. Figures are printed as ratios against the same run's smallest federation.

Writes ``bench/results/scale.md`` and ``scale.json`` (with the command that made them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import SecretStr
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.algo import Scores, TrainResult
from node.config import load as load_config
from node.models import initial_weights
from node.operate import submit_job
from node.options import JobOptions
from node.process import aggregator, serve, stop_on_signals
from node.results import JOB_FILE, MODEL_FILE
from node.site import SiteNode
from relay.codec import StateDict
from relay.envelope import AGGREGATOR, Command, ControlEnvelope, EventEnvelope
from relay.errors import InvalidInput, JobFailed
from relay.frame import decode_frame
from relay.jobspec import Aggregation, Algorithm, JobSpec
from relay.security import Identity, Roster, Security, generate
from relay.topology import Topology
from relay.transport.amqp import AmqpTransport
from relay.workflows.state import JobState
from relay.workflows.store import JobStore
from tests.broker import HOST, PASSWORD, TestBroker

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
FEDERATION = "scale"
TINY = (4, 2)
"""UNet width and depth of the tiny model (12 KB): the message path, not the bytes."""
LARGE = (24, 4)
"""UNet width and depth of the 5.4 MB model: K of them held would show in the RSS."""
JOB_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Case:
    """One job run at every federation size."""

    label: str
    algorithm: Algorithm
    model: tuple[int, int]
    rounds: int
    aggregation: Aggregation = Aggregation.MEAN

    def spec(self, sites: Sequence[str]) -> JobSpec:
        width, depth = self.model
        options = JobOptions(
            algorithm=self.algorithm,
            rounds=self.rounds,
            local_epochs=1,
            width=width,
            depth=depth,
            aggregation=self.aggregation,
        )
        return options.job(federation=FEDERATION, sites=sites)


def cases(rounds: int) -> list[Case]:
    return [
        Case("mean tiny", Algorithm.FEDAVG, TINY, rounds),
        Case("mean 5MB", Algorithm.FEDAVG, LARGE, rounds),
        Case("median 5MB", Algorithm.FEDAVG, LARGE, rounds, Aggregation.MEDIAN),
        Case("cwt tiny", Algorithm.CWT, TINY, 1),
        Case("cwt 5MB", Algorithm.CWT, LARGE, 1),
    ]


# -- the sites -------------------------------------------------------------------------------


def shift_of(index: int) -> float:
    """What site ``index``'s stand-in training adds to every weight."""
    return 1e-3 * (1 + index % 7)


def cases_of(index: int) -> int:
    """Site ``index``'s sample count (FedAvg's weight): unequal, so the weighting shows."""
    return 4 + index % 5


@dataclass(frozen=True)
class FixedScores:
    """A constant evaluation: scoring is not what is measured."""

    values: dict[str, float]

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)


class ShiftTrainer:
    """A site's stand-in for training: every floating weight plus the site's own constant."""

    def __init__(self, index: int) -> None:
        self.shift = shift_of(index)
        self.cases = cases_of(index)

    @property
    def train_count(self) -> int:
        return self.cases

    @property
    def validation_count(self) -> int:
        return 1

    def train(self, weights: StateDict, *, epochs: int, job_id: str, round: int) -> TrainResult:
        shifted = {
            name: tensor + self.shift if tensor.is_floating_point() else tensor.clone()
            for name, tensor in weights.items()
        }
        return TrainResult(shifted, self.cases, 0.0)

    def evaluate(self, members: Sequence[StateDict]) -> Scores:
        return FixedScores({"dice_mean": 0.5})

    def finalize(self, job_id: str) -> None:
        pass


def host_sites(config_path: Path, names: list[str], keys: Path, spool: Path) -> None:
    """Site-host process: ``names`` as SiteNodes, each served by a thread, until SIGTERM."""
    config = load_config(config_path)
    topology = config.topology()
    roster = Roster.load(keys / "roster.json")
    nodes = []
    for name in names:
        index = topology.sites.index(name)

        def trainer(_spec: JobSpec, index: int = index) -> ShiftTrainer:
            return ShiftTrainer(index)

        nodes.append(
            SiteNode(
                name=name,
                algo_factory=trainer,
                transport=AmqpTransport(config.broker_settings(name, SecretStr(PASSWORD))),
                topology=topology,
                spool=spool / name,
                security=Security(Identity.load(name, keys / name), roster),
            )
        )
    stop = stop_on_signals()
    threads = [threading.Thread(target=serve, args=(node, stop), daemon=True) for node in nodes]
    for thread in threads:
        thread.start()
    print(json.dumps({"ready": True}), flush=True)
    for thread in threads:
        thread.join()


# -- the aggregator --------------------------------------------------------------------------


def proc_status(pid: int | str, field: str) -> int:
    """A ``kB`` line of /proc/<pid>/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def written_bytes() -> int:
    """Bytes this process has passed to write() so far (its journal and its job state)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


class TimedStore(JobStore):
    """The aggregator's job store, counting the time its saves take."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store.directory.parent)  # the same spool
        self.seconds = 0.0
        self.saves = 0

    def save(self, job: JobState) -> None:
        began = time.perf_counter()
        super().save(job)
        self.seconds += time.perf_counter() - began
        self.saves += 1


def serve_aggregator(config_path: Path, report: Path) -> None:
    """Aggregator process: ``fedrelay aggregator run``'s code; on SIGTERM, its figures."""
    coordinator = aggregator(load_config(config_path))
    store = coordinator.store = TimedStore(coordinator.store)
    idle_rss = proc_status("self", "VmRSS")
    written, cpu = written_bytes(), time.process_time()
    stop = stop_on_signals()
    print(json.dumps({"ready": True}), flush=True)
    serve(coordinator, stop)
    figures = {
        "idle_rss": idle_rss,
        "peak_rss": proc_status("self", "VmHWM"),
        "cpu_s": time.process_time() - cpu,
        "written": written_bytes() - written,
        "save_s": store.seconds,
        "saves": store.saves,
    }
    report.write_text(json.dumps(figures))


# -- one federation size ---------------------------------------------------------------------


@dataclass
class Result:
    """One job at one federation size."""

    sites: int
    case: str
    algorithm: str
    model_bytes: int
    rounds: int
    seconds: list[float]
    """Each round's (FedAvg) or the cycle's (CWT) time, from the aggregator's events."""
    idle_rss: int
    peak_rss: int
    cpu_s: float
    written: int
    save_s: float
    saves: int
    final_error: float
    """Largest difference between the final model and the one the sites' shifts make."""
    job_s: float = 0.0
    """Submission to the aggregator's end event, seen from the submitter."""

    @property
    def steady_s(self) -> float:
        """Median round time after the first (the first includes the sites' job set-up)."""
        later = self.seconds[1:] or self.seconds
        return statistics.median(later)

    @property
    def grown(self) -> int:
        return self.peak_rss - self.idle_rss

    @property
    def in_models(self) -> str:
        """RSS growth in model sizes; "—" for the tiny model, whose growth is all fixed costs."""
        return f"{self.grown / self.model_bytes:.1f}" if self.model_bytes >= MiB else "—"


def expected_model(spec: JobSpec, initial: StateDict) -> StateDict:
    """The final model the stand-in trainers make: per round, the shifts' aggregate."""
    sites = range(len(spec.sites))
    shifts = [shift_of(i) for i in sites]
    if spec.algorithm.is_ring:
        step = sum(shifts) * spec.rounds
    elif spec.aggregation is Aggregation.MEDIAN:
        step = statistics.median(shifts) * spec.rounds
    else:
        weights = [cases_of(i) for i in sites]
        step = sum(w * s for w, s in zip(weights, shifts, strict=True)) / sum(weights)
        step *= spec.rounds
    return {n: t + step if t.is_floating_point() else t for n, t in initial.items()}


def follow(transport: AmqpTransport, topology: Topology, job_id: str) -> list[EventEnvelope]:
    """The aggregator's events about ``job_id`` until its end event (consumed as they come)."""
    events: list[EventEnvelope] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        delivery = transport.get(topology.events_queue, timeout=1.0)
        if delivery is None:
            continue
        transport.ack(delivery)
        try:
            envelope, _ = decode_frame(delivery.message.body)
        except InvalidInput:
            continue
        if envelope.job_id != job_id or envelope.sender != AGGREGATOR:
            continue
        if isinstance(envelope, EventEnvelope):
            events.append(envelope)
        elif isinstance(envelope, ControlEnvelope):
            if envelope.command is not Command.JOB_DONE:
                raise JobFailed(f"job {job_id}: {envelope.command}: {envelope.reason}")
            return events
    raise JobFailed(f"job {job_id} did not end within {JOB_TIMEOUT_S:g} s")


def times(spec: JobSpec, events: list[EventEnvelope]) -> list[float]:
    """Round periods (one round's model out to the next's), or the ring's cycle time."""
    at = {(e.event, e.detail.get("round")): e.created_at for e in events}
    evaluating = next(e.created_at for e in events if e.event == "evaluating")
    if spec.algorithm.is_ring:
        started = next(e.created_at for e in events if e.event == "job_started")
        return [evaluating - started]
    opened = [at[("round_opened", r)] for r in range(spec.rounds)] + [evaluating]
    return [b - a for a, b in itertools.pairwise(opened)]


class Size:
    """A federation of ``n`` sites on a fresh vhost, its site processes running."""

    def __init__(self, n: int, work: Path, site_processes: int) -> None:
        self.n = n
        self.work = work
        self.names = [f"site-{i + 1}" for i in range(n)]
        self.broker = TestBroker()
        self.hosts: list[subprocess.Popen[str]] = []
        try:
            self._set_up(site_processes)
        except BaseException:
            self.close()
            raise

    def _set_up(self, site_processes: int) -> None:
        for party in (AGGREGATOR, *self.names):
            self.broker.settings(party)  # creates the broker user, full rights on the vhost
        roster, identities = generate(FEDERATION, [AGGREGATOR, *self.names], encrypt_payloads=False)
        self.keys = self.work / "keys"
        self.keys.mkdir(parents=True)
        roster.save(self.keys / "roster.json")
        for name, identity in identities.items():
            identity.save(self.keys / name)
        self.aggregator_security = Security(identities[AGGREGATOR], roster)
        self.topology = Topology(FEDERATION, tuple(self.names))
        self.transport = AmqpTransport(self.broker.settings(AGGREGATOR))
        self.transport.declare(self.topology)
        config = self.config("sites")
        spool = Path(tempfile.mkdtemp(prefix="fedrelay-scale-", dir="/dev/shm"))
        self.site_spool = spool
        for p in range(site_processes):
            names = self.names[p::site_processes]
            if not names:
                continue
            log = (self.work / f"sites-{p}.log").open("w")
            host = subprocess.Popen(
                [
                    *(sys.executable, __file__, "--host-sites", str(config)),
                    *(",".join(names), str(self.keys), str(spool)),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            self.hosts.append(host)
        for host in self.hosts:
            ready(host, self.work / "sites-0.log")

    def config(self, label: str) -> Path:
        """A federation file whose aggregator keeps its spool and results under ``label``."""
        folder = self.work / label.replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            f'federation = "{FEDERATION}"',
            "[broker]",
            f'host = "{HOST}"',
            f'vhost = "{self.broker.vhost}"',
            "[security]",
            f'roster = "{self.keys / "roster.json"}"',
            f'keys = "{self.keys / AGGREGATOR}"',
            "[aggregator]",
            f'password = "{PASSWORD}"',
            f'spool = "{folder / "spool"}"',
            f'output = "{folder / "results"}"',
            *(f"[sites.{name}]" for name in self.names),
        ]
        path = folder / "federation.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def run(self, case: Case) -> Result:
        """Run ``case`` with a fresh aggregator process; its figures."""
        config = self.config(case.label)
        folder = config.parent
        report = folder / "aggregator.json"
        log = (folder / "aggregator.log").open("w")
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve-aggregator", str(config), str(report)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            ready(process, folder / "aggregator.log")
            spec = case.spec(self.names)
            initial = initial_weights(spec.model, seed=spec.seed)
            began = time.perf_counter()
            submit_job(
                self.transport, self.topology, spec, initial, security=self.aggregator_security
            )
            events = follow(self.transport, self.topology, spec.job_id)
            job_s = time.perf_counter() - began
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        figures = json.loads(report.read_text())
        results = folder / "results" / spec.job_id
        record = json.loads((results / JOB_FILE).read_text())
        assert record["status"] == "done", record
        final = load_file(str(results / MODEL_FILE))
        expected = expected_model(spec, initial)
        error = max(float((final[n] - t).abs().max()) for n, t in expected.items())
        if error > 1e-5:
            raise SystemExit(
                f"{case.label}, {self.n} sites: the final model is off by {error:g}: an update "
                f"was lost or counted twice (see {folder})"
            )
        return Result(
            sites=self.n,
            case=case.label,
            algorithm=str(case.algorithm),
            model_bytes=sum(t.numel() * t.element_size() for t in initial.values()),
            rounds=spec.rounds,
            seconds=times(spec, events),
            final_error=error,
            job_s=job_s,
            **figures,
        )

    def close(self) -> None:
        for host in self.hosts:
            if host.poll() is None:
                host.send_signal(signal.SIGTERM)
        for host in self.hosts:
            try:
                host.wait(timeout=60)
            except subprocess.TimeoutExpired:
                host.kill()
        if hasattr(self, "transport"):
            self.transport.close()
        if hasattr(self, "site_spool"):
            shutil.rmtree(self.site_spool, ignore_errors=True)
        self.broker.delete()


def ready(process: subprocess.Popen[str], log: Path) -> None:
    """Wait for a child's ready line; fail with its log if it dies first."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise SystemExit(
            f"{process.args!r} exited {process.returncode}:\n{log.read_text()[-4000:]}"
        )
    assert json.loads(line)["ready"]


# -- report ----------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / MiB:.0f}"


def table(results: list[Result]) -> list[str]:
    """Markdown rows: every job at every size, against the smallest size's same job."""
    smallest = min(r.sites for r in results)
    base = {r.case: r for r in results if r.sites == smallest}
    rows = [
        "| job | sites | round or cycle s | × smallest | per site ms | agg CPU s/round "
        "| save s/round | written MB/round | agg peak RSS MiB | RSS growth MiB "
        "| growth / model | peak × smallest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (list(base).index(r.case), r.sites)):
        b = base[r.case]
        periods = max(1, r.rounds)
        rows.append(
            f"| {r.case} | {r.sites} | {r.steady_s:.2f} | {r.steady_s / b.steady_s:.2f} "
            f"| {r.steady_s / r.sites * 1000:.0f} | {r.cpu_s / periods:.2f} "
            f"| {r.save_s / periods:.2f} | {r.written / periods / 1e6:.0f} "
            f"| {mib(r.peak_rss)} | {mib(r.grown)} | {r.in_models} "
            f"| {r.peak_rss / b.peak_rss:.2f} |"
        )
    return rows


def write_report(
    results: list[Result], args: argparse.Namespace, wall_s: float, load: list[float]
) -> None:
    command = " ".join([".venv/bin/python bench/scale.py", *args.argv])
    lines = [
        "# Federation scale: round time and aggregator memory against the number of sites",
        "",
        f"`{command}`: sites {args.sites}, {args.rounds} FedAvg rounds, one CWT cycle, "
        f"sites in {args.site_processes} processes; {wall_s / 60:.1f} min on "
        f"{os.cpu_count()} CPU core(s), RabbitMQ on the same machine; load average (1 min) "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end. Times are wall-clock times on "
        "a machine shared with whatever else runs; the memory figures do not depend on that.",
        "",
        "How to read it:",
        "",
        "- *round or cycle s*: FedAvg, the median round (the global model out to the next "
        "round's out) after the first round; CWT, one whole cycle (N site visits and the "
        "token's way back). *× smallest*: against the same job at the smallest size.",
        "- *per site ms*: that time over the number of sites (flat: linear scaling).",
        "- *agg CPU s/round*, *save s/round*, *written MB/round*: the aggregator process's CPU "
        "time, the time it spent saving job state, and the bytes it wrote (journal and job "
        "state), per round or cycle.",
        "- *agg peak RSS*: the aggregator process's VmHWM; *RSS growth*: above its idle RSS "
        "before the job; *growth / model*: that in units of the model's size (a FedAvg "
        "aggregator holding every update would grow by about N; — for the 12 KB model, whose "
        "growth is the process's fixed costs); *peak × smallest*: peak RSS against the "
        "smallest size's.",
        "- Every job's final model matched the one the sites' known updates make (largest "
        f"error {max(r.final_error for r in results):.1e}).",
        "",
        *table(results),
        "",
    ]
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "scale.md").write_text("\n".join(lines))
    record = {
        "command": command,
        "wall_s": wall_s,
        "load_average": load,
        "results": [asdict(r) | {"steady_s": r.steady_s, "grown": r.grown} for r in results],
    }
    (out / "scale.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="5,10,25,50", help="federation sizes")
    parser.add_argument("--quick", action="store_true", help="5 and 10 sites only")
    parser.add_argument(
        "--rounds", type=int, default=None, help="FedAvg rounds per job [4; --quick: 3]"
    )
    parser.add_argument("--site-processes", type=int, default=2, help="processes hosting sites")
    parser.add_argument("--only", default="", help="comma-separated job labels to run")
    parser.add_argument("--host-sites", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--serve-aggregator", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host_sites:
        config, names, keys, spool = args.host_sites
        host_sites(Path(config), names.split(","), Path(keys), Path(spool))
        return
    if args.serve_aggregator:
        serve_aggregator(Path(args.serve_aggregator[0]), Path(args.serve_aggregator[1]))
        return
    args.argv = sys.argv[1:]
    if args.quick:
        args.sites = "5,10"
    args.rounds = args.rounds or (3 if args.quick else 4)
    sizes = [int(s) for s in args.sites.split(",")]
    wanted = [c for c in cases(args.rounds) if not args.only or c.label in args.only.split(",")]
    torch.set_num_threads(1)
    began = time.perf_counter()
    load = [os.getloadavg()[0]]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fedrelay-scale-") as scratch:
        for n in sizes:
            size = Size(n, Path(scratch) / str(n), args.site_processes)
            try:
                for case in wanted:
                    result = size.run(case)
                    results.append(result)
                    print(
                        f"{n:>3} sites  {case.label:<11} {result.steady_s:7.2f} s  "
                        f"peak RSS {mib(result.peak_rss)} MiB (+{mib(result.grown)}, "
                        f"{result.in_models} × model)  save "
                        f"{result.save_s:.2f} s  cpu {result.cpu_s:.1f} s",
                        flush=True,
                    )
            finally:
                size.close()
    wall_s = time.perf_counter() - began
    load.append(os.getloadavg()[0])
    write_report(results, args, wall_s, load)
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
