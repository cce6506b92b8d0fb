"""``fedrelay report``: a job's results as a markdown page with PNG plots.

Reads a simulation's ``results.json`` (or the folder holding it), or a deployed job turned
into the same results by :mod:`node.jobreport`, and writes, beside it or where asked:
``report.md`` and ``dice.png`` (the global model's mean Dice against training, and each
site's score of the model it received; its points in ``dice.csv``), ``regions.png`` (final
Dice per region and site), ``traffic.png`` (MB moved by message kind), ``rounds.png``
(seconds per round, when the job has rounds), ``hops.png`` (seconds from a model's arrival at
a site to its sending on, where known) and ``privacy.png`` (ε spent per site, under
differential privacy). The global curve is :mod:`node.curves`' own, the one the workflow
benchmark plots.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node.curves import federated_curve, pyplot
from node.simulate import RESULTS_FILE, SimulationResult
from relay.errors import ConfigError, EnvelopeError
from relay.validation import parse_json

REPORT_FILE = "report.md"
CURVES_FILE = "dice.csv"
MAX_WIDTH_IN = 20.0
"""The widest bar chart, in inches (2400 pixels)."""
CROWDED = 20
"""Bar groups beyond which their labels are turned upright and small."""
REGIONS = (("dice_wt", "WT"), ("dice_tc", "TC"), ("dice_et", "ET"), ("dice_mean", "mean"))


@dataclass(frozen=True)
class HopTime:
    """A site's seconds from receiving a model to sending its trained one on."""

    site: str
    round: int
    hop: int
    to: str
    seconds: float


@dataclass(frozen=True)
class Context:
    """What a report says beyond the results themselves: where they come from, what they
    lack (a deployed job's report), and figures a simulation's results do not hold."""

    source: str = ""
    """Where the figures come from, if not a simulation's results.json."""
    notes: tuple[str, ...] = ()
    """What the reader must know: missing curves, an unreadable events log."""
    hops: tuple[HopTime, ...] = ()
    traffic_counted: bool = True
    """False where the bytes moved are not known (a deployed job: events carry no sizes)."""
    wall_time_known: bool = True


@dataclass(frozen=True)
class Series:
    """One line of ``dice.png``: ``x`` in ``unit``, mean Dice at each point."""

    name: str
    unit: str
    x: tuple[float, ...]
    dice_mean: tuple[float, ...]


def load_results(path: Path) -> SimulationResult:
    """A results file, or the folder holding one; ConfigError says what is missing or wrong."""
    file = path / RESULTS_FILE if path.is_dir() else path
    try:
        text = file.read_text()
    except OSError as e:
        raise ConfigError(
            f"{file}: cannot be read ({e.strerror}); give a results.json or its folder "
            "(`fedrelay simulate --output` writes one), or a deployed job's folder "
            "(<the aggregator's output>/<job id>, holding job.json)"
        ) from e
    try:
        return parse_json(SimulationResult, text, what=str(file))
    except EnvelopeError as e:
        raise ConfigError(f"{e}; is it a results.json of this fedrelay version?") from e


SLANTED = 5
"""Past this many groups, bar labels are slanted so that neighbours do not overlap."""


def _bars(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> None:
    """Grouped bars: one group per key of ``groups``, one bar per inner key (of any group)."""
    plt = pyplot()
    series = list(dict.fromkeys(name for values in groups.values() for name in values))
    # Wide enough to read a few groups, capped for jobs of many rounds or ring hops.
    width_in = min(MAX_WIDTH_IN, max(6.0, 1.2 * len(groups) * len(series) / 2))
    figure, axis = plt.subplots(figsize=(width_in, 4.2))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [g + i * width for g in range(len(groups))]
        axis.bar(xs, [values.get(name, 0.0) for values in groups.values()], width, label=name)
    crowded = len(groups) > CROWDED
    slanted = not crowded and len(groups) > SLANTED  # long names such as model:evaluate
    axis.set_xticks(
        [g + 0.4 - width / 2 for g in range(len(groups))],
        list(groups),
        rotation=90 if crowded else 30 if slanted else 0,
        ha="right" if slanted else "center",
        fontsize="x-small" if crowded else None,
    )
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def dice_series(result: SimulationResult) -> tuple[Series | None, list[Series], str]:
    """What ``dice.png`` draws: the global curve (None, with the reason, where there is
    none) and each site's score of each model it received."""
    job = result.job
    try:
        curve = federated_curve(result)
        overall: Series | None = Series("global", "epochs per site", curve.epochs, curve.values)
        why = ""
    except ValueError as e:  # a job that did not finish, or results without dice_mean
        overall, why = None, str(e)
    unit = "cycle" if job.algorithm.is_ring else "round"
    visits = len(job.sites)
    sites = []
    for site in sorted({row.site for row in result.history}):
        rows = [r for r in result.history if r.site == site and r.stage == "received"]
        xs = [r.round + r.hop / visits if job.algorithm.is_ring else r.round for r in rows]
        scores = [r.metrics.get("dice_mean", 0.0) for r in rows]
        sites.append(Series(site, unit, tuple(float(x) for x in xs), tuple(scores)))
    return overall, sites, why


def _site_curves(result: SimulationResult, path: Path) -> None:
    """Global mean Dice against training, and each site's score of what it received; the
    points go to ``dice.csv`` beside the plot too."""
    overall, sites, why = dice_series(result)
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    title = f"{result.job.algorithm}: the federation's model, all sites"
    if overall is not None:
        axes[0].plot(overall.x, overall.dice_mean, marker="o", markersize=3, label="global")
    else:
        title += f"\n(no curve: {why})"
    axes[0].set_title(title, fontsize="medium")
    axes[0].set_xlabel("epochs of training per site")
    axes[0].set_ylabel("mean Dice (WT, TC, ET)")
    for series in sites:
        axes[1].plot(series.x, series.dice_mean, marker="o", label=series.name)
    axes[1].set_title("each site's score of the model it received")
    axes[1].set_xlabel("cycle" if result.job.algorithm.is_ring else "round")
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    with (path.parent / CURVES_FILE).open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["series", "x", "unit", "dice_mean"])
        for series in ([overall] if overall is not None else []) + sites:
            for x, value in zip(series.x, series.dice_mean, strict=True):
                writer.writerow([series.name, f"{x:g}", series.unit, f"{value:.6f}"])


def _hops(result: SimulationResult, hops: Sequence[HopTime], path: Path) -> list[str]:
    """``hops.png`` and its markdown: per FedAvg or ensemble round, a bar per site; per ring
    visit, one bar."""
    if result.job.algorithm.is_ring:
        groups = {f"c{h.round} h{h.hop}\n{h.site}": {"s": h.seconds} for h in hops}
    else:
        groups = {}
        for h in hops:
            groups.setdefault(f"round {h.round}", {})[h.site] = h.seconds
    _bars(path, "seconds from a model's arrival at a site to its sending on", groups, "s")
    slowest = max(hops, key=lambda h: h.seconds)
    unit = "cycle" if result.job.algorithm.is_ring else "round"
    return [
        "## Time per hop",
        "",
        f"{len(hops)} hop(s), {sum(h.seconds for h in hops):.1f} s in all at the sites "
        f"(scoring, training, sending); the slowest: {slowest.site} in {unit} "
        f"{slowest.round} hop {slowest.hop}, {slowest.seconds:.1f} s.",
        "",
        f"![Time per hop]({path.name})",
        "",
    ]


def write_report(result: SimulationResult, folder: Path, *, context: Context | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``folder``; return the markdown file."""
    context = context or Context()
    folder.mkdir(parents=True, exist_ok=True)
    job = result.job
    took = f"in {result.wall_time_s:.1f} s" if context.wall_time_known else "(time not known)"
    lines = [
        f"# fedrelay job {job.job_id}: {job.algorithm}, {len(job.sites)} sites",
        "",
        f"**{result.status}**{': ' + result.reason if result.reason else ''} {took}; "
        f"{job.rounds} round(s) of {job.training.local_epochs} local epoch(s); model "
        f"{job.model.name} (width {job.model.width}, depth {job.model.depth}).",
        "",
    ]
    if context.source:
        lines += [f"From {context.source}.", ""]
    for note in context.notes:
        lines += [f"> **Note:** {note}", ""]
    lines += [
        "## Dice",
        "",
        "| site | " + " | ".join(label for _, label in REGIONS) + " | untrained mean |",
        "|---|" + "---:|" * (len(REGIONS) + 1),
    ]
    for site, metrics in result.final.items():
        scores = " | ".join(f"{metrics.get(key, 0.0):.3f}" for key, _ in REGIONS)
        lines.append(f"| {site} | {scores} | {_untrained(result.initial.get(site, {}))} |")
    overall = " | ".join(f"**{result.final_overall.get(key, 0.0):.3f}**" for key, _ in REGIONS)
    lines += [f"| all sites | {overall} | {_untrained(result.initial_overall)} |", ""]
    if not result.final:
        lines += ["No final scores: the job ended before the sites scored a final model.", ""]
    if result.history:
        _site_curves(result, folder / "dice.png")
        lines += [
            "![Dice against training](dice.png)",
            "",
            f"Its points: [{CURVES_FILE}]({CURVES_FILE}).",
            "",
        ]
    if result.final:
        groups = {
            site: {label: m.get(key, 0.0) for key, label in REGIONS[:3]}
            for site, m in {**result.final, "all sites": result.final_overall}.items()
        }
        _bars(folder / "regions.png", "final Dice per region", groups, "Dice")
        lines += ["![Dice per region](regions.png)", ""]
    moved = result.bytes_moved
    if not context.traffic_counted:
        lines += [
            "## Traffic: not known",
            "",
            "A deployed job's events do not carry message sizes: traffic is counted in "
            "simulations only (`fedrelay simulate`).",
            "",
        ]
    else:
        lines += [f"## Traffic: {moved.total_bytes / 1e6:.1f} MB moved", ""]
    if moved.bytes_by_kind:
        traffic = {kind: {"MB": size / 1e6} for kind, size in moved.bytes_by_kind.items()}
        _bars(folder / "traffic.png", "MB published, by message kind", traffic, "MB")
        lines += ["![Traffic by kind](traffic.png)", ""]
    if result.rounds:
        seconds = {str(r.round): {"s": r.seconds} for r in result.rounds}
        _bars(folder / "rounds.png", "seconds per round", seconds, "s")
        closed = ", ".join(sorted({r.closed_by for r in result.rounds}))
        lines += ["## Rounds", "", f"Closed by: {closed}.", "", "![Round times](rounds.png)", ""]
    if context.hops:
        lines += _hops(result, context.hops, folder / "hops.png")
    if result.privacy:
        spent = {site: {"ε": p.epsilon} for site, p in result.privacy.items()}
        _bars(folder / "privacy.png", "privacy spent per site (ε)", spent, "ε")
        delta = next(iter(result.privacy.values())).delta
        lines += [
            "## Privacy",
            "",
            f"Differential privacy at every site: ε per site at δ = {delta:g}, after the last "
            "round.",
            "",
            "| site | ε |",
            "|---|---:|",
            *(f"| {site} | {p.epsilon:,.2f} |" for site, p in result.privacy.items()),
            "",
            "![Privacy spent](privacy.png)",
            "",
        ]
    if result.refused_hops:
        lines += ["## Ring hops the validation gate refused", ""]
        lines += [
            f"- cycle {r.cycle} hop {r.hop}: {r.site} refused {r.sender}'s model (Dice "
            f"{r.dice_mean:.3f} against {r.reference_dice_mean:.3f})"
            for r in result.refused_hops
        ]
        lines.append("")
    if result.dead_letters or result.late:
        lines += ["## Refused and late messages", ""]
        lines += [f"- dead-lettered: {reason}" for reason in result.dead_letters]
        lines += [f"- late: {note}" for note in result.late]
        lines.append("")
    report = folder / REPORT_FILE
    report.write_text("\n".join(lines))
    return report


def _untrained(metrics: dict[str, float]) -> str:
    """The untrained model's mean Dice; a dash where it was not measured (a deployed ring
    job: only its first site scores the initial model)."""
    return f"{metrics['dice_mean']:.3f}" if "dice_mean" in metrics else "-"
