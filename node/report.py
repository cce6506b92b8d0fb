"""``fedrelay report``: a job's results as a markdown page with PNG plots.

Reads a simulation's ``results.json`` (or the folder holding it) and writes, beside it or
where asked: ``report.md`` and ``dice.png`` (the global model's mean Dice against training,
and each site's score of the model it received), ``regions.png`` (final Dice per region and
site), ``traffic.png`` (MB moved by message kind), ``rounds.png`` (seconds per round, when
the job has rounds) and ``privacy.png`` (ε spent per site, under differential privacy). The
global curve is :mod:`node.curves`' own, the one the workflow benchmark plots.
"""

from __future__ import annotations

from pathlib import Path

from node.curves import federated_curve, pyplot
from node.simulate import RESULTS_FILE, SimulationResult
from relay.errors import ConfigError, EnvelopeError
from relay.validation import parse_json

REPORT_FILE = "report.md"
REGIONS = (("dice_wt", "WT"), ("dice_tc", "TC"), ("dice_et", "ET"), ("dice_mean", "mean"))


def load_results(path: Path) -> SimulationResult:
    """A results file, or the folder holding one; ConfigError says what is missing or wrong."""
    file = path / RESULTS_FILE if path.is_dir() else path
    try:
        text = file.read_text()
    except OSError as e:
        raise ConfigError(
            f"{file}: cannot be read ({e.strerror}); give a results.json or its folder "
            "(`fedrelay simulate --output` writes one)"
        ) from e
    try:
        return parse_json(SimulationResult, text, what=str(file))
    except EnvelopeError as e:
        raise ConfigError(f"{e}; is it a results.json of this fedrelay version?") from e


def _bars(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> None:
    """Grouped bars: one group per key of ``groups``, one bar per inner key."""
    plt = pyplot()
    series = list(next(iter(groups.values())))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * len(series) / 2), 4.2))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [g + i * width for g in range(len(groups))]
        axis.bar(xs, [values.get(name, 0.0) for values in groups.values()], width, label=name)
    axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _site_curves(result: SimulationResult, path: Path) -> None:
    """Global mean Dice against training, and each site's score of what it received."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    title = f"{result.job.algorithm}: the federation's model, all sites"
    try:
        curve = federated_curve(result)
        axes[0].plot(curve.epochs, curve.values, marker="o", markersize=3, label="global")
    except ValueError as e:  # a job that did not finish, or results without dice_mean
        title += f"\n(no curve: {e})"
    axes[0].set_title(title, fontsize="medium")
    axes[0].set_xlabel("epochs of training per site")
    axes[0].set_ylabel("mean Dice (WT, TC, ET)")
    sites = sorted({row.site for row in result.history})
    visits = len(result.job.sites)
    for site in sites:
        rows = [r for r in result.history if r.site == site and r.stage == "received"]
        xs = [r.round + r.hop / visits if result.job.algorithm.is_ring else r.round for r in rows]
        axes[1].plot(xs, [r.metrics.get("dice_mean", 0.0) for r in rows], marker="o", label=site)
    axes[1].set_title("each site's score of the model it received")
    axes[1].set_xlabel("cycle" if result.job.algorithm.is_ring else "round")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(result: SimulationResult, folder: Path) -> Path:
    """Write ``report.md`` and its PNGs into ``folder``; return the markdown file."""
    folder.mkdir(parents=True, exist_ok=True)
    job = result.job
    lines = [
        f"# fedrelay job {job.job_id}: {job.algorithm}, {len(job.sites)} sites",
        "",
        f"**{result.status}**{': ' + result.reason if result.reason else ''} in "
        f"{result.wall_time_s:.1f} s; {job.rounds} round(s) of {job.training.local_epochs} "
        f"local epoch(s); model {job.model.name} (width {job.model.width}, depth "
        f"{job.model.depth}).",
        "",
        "## Dice",
        "",
        "| site | " + " | ".join(label for _, label in REGIONS) + " | untrained mean |",
        "|---|" + "---:|" * (len(REGIONS) + 1),
    ]
    for site, metrics in result.final.items():
        scores = " | ".join(f"{metrics.get(key, 0.0):.3f}" for key, _ in REGIONS)
        untrained = result.initial.get(site, {}).get("dice_mean", 0.0)
        lines.append(f"| {site} | {scores} | {untrained:.3f} |")
    overall = " | ".join(f"**{result.final_overall.get(key, 0.0):.3f}**" for key, _ in REGIONS)
    untrained = result.initial_overall.get("dice_mean", 0.0)
    lines += [f"| all sites | {overall} | {untrained:.3f} |", ""]
    if result.history:
        _site_curves(result, folder / "dice.png")
        lines += ["![Dice against training](dice.png)", ""]
    if result.final:
        groups = {
            site: {label: m.get(key, 0.0) for key, label in REGIONS[:3]}
            for site, m in {**result.final, "all sites": result.final_overall}.items()
        }
        _bars(folder / "regions.png", "final Dice per region", groups, "Dice")
        lines += ["![Dice per region](regions.png)", ""]
    moved = result.bytes_moved
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
