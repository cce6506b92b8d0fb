"""Benchmark: FedAvg, ensemble, SWT and CWT against centralized and local-only training.

    .venv/bin/python bench/federated.py            # both settings, 3 seeds (≤ 30 min, 2 cores)
    .venv/bin/python bench/federated.py --quick    # one seed, fewer rounds (≤ 5 min)
    .venv/bin/python bench/federated.py --settings similar --rounds 200 --methods fedavg
                                                   # FedAvg against centralized at convergence

Every method trains on the same generated brain-tumour phantom data with the same budget,
``--rounds`` × ``--local-epochs`` epochs of training per site:

- **centralized**: one model on all sites' training cases pooled (the reference);
- **local only**: each site alone on its own cases (scored on its own cases); **best single
  local** is the one local model that scores best over every site's cases;
- **ensemble**: the local models, output-averaged;
- **SWT**: one pass around the ring, ``rounds × local_epochs`` epochs at each site;
- **CWT**: ``rounds`` cycles around the ring, ``local_epochs`` at each site per visit;
- **FedAvg**: ``rounds`` rounds of ``local_epochs`` at every site, averaged by case count.

in two settings: **similar**, 4 sites with even case counts and scanners close together
(``heterogeneity`` 0.25), and **brats**, 10 sites sharing the cases in the BraTS
institutions' proportions (70:27:17:12:11:9:6:6:4:3) with the widest spread of scanners and
lesion sizes. (The settings differ in site count, case split and heterogeneity at once, so a
difference between them cannot be pinned on one of those.) Every federated method runs as a
real job on the embedded broker, so the bytes it moves are counted envelope by envelope;
every model is scored on every site's validation cases, weighted by their number.

``--methods`` picks the federated jobs (default all); FedAvg's run is always among them, as it
also trains the centralized and local-only baselines that every other figure is read against.

Writes, under ``--output`` (default ``bench/results``): ``federated.md`` (the tables and how
to read them), ``federated.png`` (mean Dice against epochs of training per site, mean ± std
over seeds) and ``federated.json`` (the settings and every run's figures, written after each
run so a failure keeps what was measured), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.curves import Band, Curve, baseline_curve, federated_curve, plot
from node.options import SimulationConfig
from node.phantom import MODALITIES
from node.simulate import SimulationResult, simulate
from relay.jobspec import Algorithm
from relay.validation import describe

REGIONS = ("dice_wt", "dice_tc", "dice_et", "dice_mean")
REFERENCE = "centralized"
DP = "fedavg + DP"
METHODS = ("centralized", "local only", "best single local", "ensemble", "swt", "cwt", "fedavg", DP)
PLOTTED = ("centralized", "local only", "ensemble", "swt", "cwt", "fedavg", DP)
TARGET = 0.95  # "rounds to 95% of centralized"
FLOORS = (("fedavg", 0.97), ("cwt", 0.95))  # DESIGN.md's targets, after Sheller et al. 2018
JOBS = ("fedavg", "cwt", "swt", "ensemble", DP)
""":meth:`Plan.configs`' jobs; FedAvg's run trains the centralized and local-only baselines."""
OPTIONS = {"dp" if job == DP else job: job for job in JOBS}
"""``--methods``' names for :data:`JOBS`."""


@dataclass(frozen=True)
class Setting:
    """A federation to benchmark on."""

    name: str
    title: str
    sites: int
    cases_per_site: int
    case_split: str
    heterogeneity: float


SETTINGS = {
    "similar": Setting("similar", "4 similar sites", 4, 8, "even", 0.25),
    "brats": Setting("brats", "10 sites in BraTS proportions", 10, 6, "brats", 1.0),
}


@dataclass(frozen=True)
class Plan:
    """What to run: the settings, the seeds, and the budget and model every method shares."""

    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    rounds: int
    local_epochs: int
    volume_size: int
    width: int
    depth: int
    learning_rate: float
    dp_noise: float
    """FedAvg with differential privacy at this noise multiplier, as well; 0: not run."""
    dp_clip: float
    methods: tuple[str, ...] = JOBS
    """The federated jobs to run (``--methods``); FedAvg's also trains the baselines."""

    def configs(self, setting: Setting, seed: int) -> dict[str, SimulationConfig]:
        """The federated jobs on ``setting`` with ``seed``, at one matched budget; FedAvg's
        also trains the centralized and local-only baselines."""
        common = {
            "sites": setting.sites,
            "cases_per_site": setting.cases_per_site,
            "case_split": setting.case_split,
            "heterogeneity": setting.heterogeneity,
            "volume_size": self.volume_size,
            "width": self.width,
            "depth": self.depth,
            "learning_rate": self.learning_rate,
            "seed": seed,
        }
        rounds, epochs = self.rounds, self.local_epochs
        jobs = {
            "fedavg": {"algorithm": Algorithm.FEDAVG, "rounds": rounds, "local_epochs": epochs},
            "cwt": {"algorithm": Algorithm.CWT, "rounds": rounds, "local_epochs": epochs},
            # One pass, with the whole budget at each site.
            "swt": {"algorithm": Algorithm.SWT, "rounds": 1, "local_epochs": rounds * epochs},
            "ensemble": {"algorithm": Algorithm.ENSEMBLE, "rounds": rounds, "local_epochs": epochs},
        }
        if self.dp_noise:
            private = {"dp_noise_multiplier": self.dp_noise, "dp_clip_norm": self.dp_clip}
            jobs[DP] = jobs["fedavg"] | private
        return {
            method: SimulationConfig.model_validate(
                common | job | {"baselines": method == "fedavg"}
            )
            for method, job in jobs.items()
            if method in self.methods
        }


@dataclass
class Run:
    """One method on one setting and seed."""

    setting: str
    seed: int
    method: str
    final: dict[str, float]
    curve: Curve | None
    megabytes: float | None
    """Training traffic (the final model's trip to every site to be scored left out); for
    centralized, the training images it would pool."""
    seconds: float | None
    best_site: str | None = None
    epsilon: float | None = None
    """With differential privacy: the largest ε any site spent (at δ 1e-5)."""


def main() -> None:
    """Run the plan from the command line, then write and print the report."""
    plan, output = _arguments()
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: list[Run] = []
    for setting in plan.settings:
        for seed in plan.seeds:
            for run in _benchmark(plan, setting, seed, log=lambda line: print(line, flush=True)):
                runs.append(run)
                _save(plan, runs, output)
    report = _report(plan, runs, time.perf_counter() - started)
    (output / "federated.md").write_text(report)
    _plot(plan, runs, output / "federated.png")
    print(report)
    print(f"wrote {output}/federated.md, federated.png, federated.json")


def _arguments() -> tuple[Plan, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer rounds (≤ 5 min)")
    parser.add_argument("--settings", type=_names, default=",".join(SETTINGS), help="similar,brats")
    parser.add_argument("--seeds", type=_seeds, default=None, help="[default: 0,1,2; quick: 0]")
    parser.add_argument("--rounds", type=_positive, default=None, help="[default: 20; quick: 8]")
    parser.add_argument("--local-epochs", type=_positive, default=1)
    parser.add_argument("--volume-size", type=_positive, default=None, help="[24; quick: 16]")
    parser.add_argument("--width", type=_positive, default=8)
    parser.add_argument("--depth", type=_positive, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument(
        "--dp-noise", type=float, default=0.03, help="FedAvg + DP's noise multiplier; 0: skip"
    )
    parser.add_argument("--dp-clip", type=float, default=3.0, help="FedAvg + DP's clip norm")
    parser.add_argument(
        "--methods",
        type=_methods,
        default=JOBS,
        help=f"federated jobs to run, of {','.join(OPTIONS)} [default: all]; fedavg's run also "
        "trains centralized and local only, which every %% of centralized needs",
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    plan = Plan(
        settings=tuple(SETTINGS[name] for name in args.settings),
        seeds=args.seeds if args.seeds is not None else ((0,) if args.quick else (0, 1, 2)),
        rounds=args.rounds if args.rounds is not None else (8 if args.quick else 20),
        local_epochs=args.local_epochs,
        volume_size=args.volume_size
        if args.volume_size is not None
        else (16 if args.quick else 24),
        width=args.width,
        depth=args.depth,
        learning_rate=args.learning_rate,
        dp_noise=args.dp_noise,
        dp_clip=args.dp_clip,
        methods=args.methods,
    )
    try:  # every job is checked before the first one starts
        for setting in plan.settings:
            plan.configs(setting, plan.seeds[0])
    except ValidationError as error:
        parser.error(describe(error, what="option"))
    return plan, args.output


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _seeds(text: str) -> tuple[int, ...]:
    seeds = tuple(int(part) for part in text.split(","))
    if any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds >= 0, e.g. 0,1,2")
    return seeds


def _names(text: str) -> tuple[str, ...]:
    return _choices(text, tuple(SETTINGS), "settings")


def _methods(text: str) -> tuple[str, ...]:
    methods = _choices(text, tuple(OPTIONS), "methods")
    if "fedavg" not in methods:
        raise argparse.ArgumentTypeError(
            f"{text!r}: include fedavg, whose run trains the centralized baseline that every "
            "other method is measured against"
        )
    return tuple(OPTIONS[name] for name in methods)


def _choices(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = sorted(set(names) - set(known))
    if unknown or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give distinct {what} from {list(known)}"
            + (f"; unknown: {unknown}" if unknown else "")
        )
    return names


def _benchmark(plan: Plan, setting: Setting, seed: int, *, log: Callable[[str], None]) -> list[Run]:
    """Every method on ``setting`` with ``seed``."""
    runs = []
    for method, config in plan.configs(setting, seed).items():
        began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fedrelay-bench-") as output:
            result = simulate(config, Path(output))
        if result.status != "done":
            raise SystemExit(
                f"{setting.name} seed {seed} {method}: job {result.status}: {result.reason} "
                "(the runs before it are in federated.json)"
            )
        # FedAvg's run trains the baselines too; each is timed on its own.
        baselines = sum(b.wall_time_s for b in result.baselines.values())
        seconds = time.perf_counter() - began - baselines
        moved = result.bytes_moved
        training = moved.total_bytes - moved.bytes_by_kind.get("model:evaluate", 0)
        final = _scores(result.final_overall)
        spent = max((p.epsilon for p in result.privacy.values()), default=None)
        curve = federated_curve(result)
        runs.append(
            Run(setting.name, seed, method, final, curve, training / 1e6, seconds, None, spent)
        )
        log(f"{setting.name} seed {seed} {method}: {final} in {seconds:.0f} s")
        if method == "fedavg":
            runs += _baseline_runs(plan, setting.name, seed, result)
    return runs


def _baseline_runs(plan: Plan, setting: str, seed: int, result: SimulationResult) -> list[Run]:
    central, local = result.baselines["centralized"], result.baselines["local"]
    assert local.best_single_overall is not None
    # float32 phantom images, every channel; the labels would travel too.
    image_bytes = len(MODALITIES) * plan.volume_size**3 * 4
    images = sum(d.train_cases for d in result.data.values()) * image_bytes
    return [
        Run(setting, seed, "centralized", _scores(central.final_overall),
            baseline_curve(result, "centralized"), images / 1e6, central.wall_time_s),
        Run(setting, seed, "local only", _scores(local.final_overall),
            baseline_curve(result, "local"), None, local.wall_time_s),
        Run(setting, seed, "best single local", _scores(local.best_single_overall), None, None,
            None, local.best_single),
    ]  # fmt: skip


def _scores(overall: dict[str, float]) -> dict[str, float]:
    return {key: round(overall[key], 4) for key in REGIONS}


def _save(plan: Plan, runs: Sequence[Run], output: Path) -> None:
    record = {"plan": asdict(plan), "runs": [asdict(run) for run in runs]}
    (output / "federated.json").write_text(json.dumps(record, indent=1) + "\n")


def _report(plan: Plan, runs: Sequence[Run], elapsed: float) -> str:
    command = " ".join([".venv/bin/python", "bench/federated.py", *sys.argv[1:]])
    epochs = plan.local_epochs
    lines = [
        "# Federated workflows against centralized and local-only training",
        "",
        f"`{command}`: phantom {plan.volume_size}³, UNet width {plan.width} depth "
        f"{plan.depth}, Adam lr {plan.learning_rate}, budget {plan.rounds} rounds × {epochs} "
        f"local epoch(s) per site, seeds {', '.join(map(str, plan.seeds))}; "
        f"{elapsed / 60:.1f} min on {_cores()} CPU core(s).",
        "",
        "How to read it:",
        "",
        "- Dice on every site's validation cases (weighted by case count), mean ± std over "
        "seeds. *Local only* scores each site's own model on its own cases; *best single "
        "local* is the one local model that scores best over every site's cases, picked on "
        "those same cases, so it is an upper bound.",
        "- *% of centralized*: the method's mean Dice over centralized's, seed by seed.",
        f"- *Rounds to {TARGET:.0%}*, per seed: the budget (in rounds of {epochs} epoch(s) per "
        f"site) from which on the method's curve stays at or above {TARGET:.0%} of "
        "centralized's final mean Dice; — where it never settles there. *End only*: the "
        "method has no model before the end (ensemble, SWT's one pass); the count says how "
        "many seeds' final models reach it. Ring curves average a whole cycle of arrivals "
        "(see `node/curves.py`), which lags them about half a cycle.",
        "- *MB moved*: every envelope a federated job published to train (models, updates, "
        "metrics), leaving out the final model's trip to every site to be scored; for "
        "centralized, the training images it would have to pool.",
        *(
            [
                f"- *{DP}*: FedAvg with every model a site sends clipped to update norm "
                f"{plan.dp_clip} and noised at multiplier {plan.dp_noise} (`--dp-noise`, "
                "`--dp-clip`)."
            ]
            if any(r.method == DP for r in runs)
            else []
        ),
        "- *time s*: one process, every site in turn; a federated job's time includes "
        "generating its data and scoring the initial model.",
    ]
    for setting in plan.settings:
        lines += ["", f"## {setting.title}", "", *_table(plan, setting, runs)]
        lines += ["", *_checks(setting, runs)]
    return "\n".join(lines) + "\n"


def _table(plan: Plan, setting: Setting, runs: Sequence[Run]) -> list[str]:
    header = (
        "| method | Dice WT | Dice TC | Dice ET | mean Dice | % of centralized "
        f"| rounds to {TARGET:.0%} | MB moved | time s |"
    )
    rows = [header, "|" + "---|" * 9]
    for method in METHODS:
        mine = _select(runs, setting.name, method)
        if not mine:
            continue
        cells = [_spread([r.final[key] for r in mine]) for key in REGIONS]
        cells.append(_spread([100 * _ratio(runs, r) for r in mine], digits=1))
        cells.append(_rounds_to_target(plan, runs, mine))
        moved = [r.megabytes for r in mine if r.megabytes is not None]
        cells.append(f"{statistics.fmean(moved):.1f}" if moved else "—")
        seconds = [r.seconds for r in mine if r.seconds is not None]
        cells.append(f"{statistics.fmean(seconds):.0f}" if seconds else "—")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows


def _rounds_to_target(plan: Plan, runs: Sequence[Run], mine: Sequence[Run]) -> str:
    if any(r.curve is None for r in mine):
        return "n/a"
    targets = [TARGET * _peer(runs, r).final["dice_mean"] for r in mine]
    curves = [r.curve for r in mine if r.curve is not None]
    if not any(curve.has_progress for curve in curves):
        reached = sum(c.values[-1] >= t for c, t in zip(curves, targets, strict=True))
        return f"end only ({reached}/{len(mine)})"
    settled = [c.settles_at(t) for c, t in zip(curves, targets, strict=True)]
    return ", ".join("—" if x is None else f"{x / plan.local_epochs:g}" for x in settled)


def _checks(setting: Setting, runs: Sequence[Run]) -> list[str]:
    """The orderings the literature leads one to expect, each with the measured figure."""
    lines = [
        "Against the literature (FedAvg 98.7 to 100% and CWT ≈ 95 to 98% of centralized; an "
        "output-averaging ensemble at least as good as its best member), seed by seed:",
        "",
    ]
    for method, floor in FLOORS:
        ratios = [_ratio(runs, r) for r in _select(runs, setting.name, method)]
        if not ratios:
            continue  # not run (--methods)
        mean = statistics.fmean(ratios)
        noise = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        verdict = "holds" if mean >= floor else "does NOT hold"
        if abs(mean - floor) < noise:
            verdict += f", within the seeds' spread (± {noise:.4f})"
        lines.append(f"- {method} ≥ {floor:.2f} × centralized: {mean:.4f} — {verdict}")
    private = _select(runs, setting.name, DP)
    if private:
        cost = [1 - _ratio(runs, r, "fedavg") for r in private]
        spent = max(r.epsilon or 0.0 for r in private)
        lines.append(
            f"- the cost of differential privacy: {DP} scores {statistics.fmean(cost):.1%} "
            f"below FedAvg (Li et al. 2019: about 4%), each site having spent ε = {spent:,.1f} "
            "at δ = 1e-5 (a guarantee only for ε of a few units)"
        )
    ensembles = _select(runs, setting.name, "ensemble")
    if not ensembles:
        return lines  # not run (--methods)
    differences = [
        ensemble.final["dice_mean"] - _peer(runs, ensemble, "best single local").final["dice_mean"]
        for ensemble in ensembles
    ]
    ahead = sum(d >= 0 for d in differences)
    verdict = "holds" if statistics.fmean(differences) >= 0 else "does NOT hold"
    lines.append(
        f"- ensemble ≥ best single local model: {statistics.fmean(differences):+.4f} mean Dice "
        f"(ahead in {ahead}/{len(differences)} seeds) — {verdict}"
    )
    return lines


def _peer(runs: Sequence[Run], run: Run, method: str = REFERENCE) -> Run:
    """``method``'s run on the same setting and seed as ``run``."""
    return _select(runs, run.setting, method, run.seed)[0]


def _ratio(runs: Sequence[Run], run: Run, method: str = REFERENCE) -> float:
    return run.final["dice_mean"] / _peer(runs, run, method).final["dice_mean"]


def _select(runs: Sequence[Run], setting: str, method: str, seed: int | None = None) -> list[Run]:
    return [
        r for r in runs
        if r.setting == setting and r.method == method and (seed is None or r.seed == seed)
    ]  # fmt: skip


def _spread(values: Sequence[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _plot(plan: Plan, runs: Sequence[Run], path: Path) -> None:
    panels = []
    for setting in plan.settings:
        bands = [
            Band(method, [r.curve for r in mine if r.curve])
            for method in PLOTTED
            if (mine := _select(runs, setting.name, method))
        ]
        target = statistics.fmean(
            TARGET * r.final["dice_mean"] for r in _select(runs, setting.name, REFERENCE)
        )
        reference = (target, f"{TARGET:.0%} of centralized (mean over seeds)")
        panels.append((setting.title, bands, reference))
    plot(panels, path, xlabel=f"epochs of training per site ({plan.local_epochs} per round)")


if __name__ == "__main__":
    main()
