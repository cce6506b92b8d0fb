"""A model's score against the training it has had: one curve per method, from a simulation's
results, on one axis that every workflow shares, and the plot of such curves.

The axis is **epochs of training per site**: a FedAvg round or a CWT cycle gives every site
``local_epochs`` epochs; a ring hop gives one site its epochs; a centralized or local-only
round is one round's worth. Methods run at a matched budget therefore end at the same point.

- FedAvg: every site scores the global model when it arrives (stage ``received``); a round's
  point is the mean over the sites, weighted by their validation cases.
- SWT / CWT: only the site the model arrives at scores it, and before training it, so the
  point after visit ``v`` (of ``K`` sites a cycle) averages the scores of visits
  ``v-K+1 … v``, one per site, weighted by validation cases as above; the first point is a
  cycle in. Such a window lags the model by about half a cycle, so rings read a little slow
  next to FedAvg, whose points score the current model everywhere. SWT's one cycle leaves
  only its final score.
- Ensemble: the members train apart; only the final output average is a model, one point.
- Centralized / local only: their scores after each round (:mod:`node.baselines`).

Every curve starts from the initial model's score on all sites (where it is known: a deployed
ring job's report lacks it) and ends at the final score.
Scores are ones where higher is better (``dice_*``), as :meth:`Curve.settles_at` assumes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.simulate import MetricsRow, SimulationResult
from relay.jobspec import Algorithm


@dataclass(frozen=True)
class Curve:
    """``values[i]`` is the score after ``epochs[i]`` epochs of training per site."""

    epochs: tuple[float, ...]
    values: tuple[float, ...]

    @property
    def has_progress(self) -> bool:
        """Whether any point lies between the start and the end of the budget."""
        return len(self.epochs) > 2

    def settles_at(self, target: float) -> float | None:
        """The fewest epochs per site from which on every score is at least ``target``; None
        if the last one is not. A noisy curve touching the target once does not count."""
        settled = None
        for x, value in zip(reversed(self.epochs), reversed(self.values), strict=True):
            if value < target:
                break
            settled = x
        return settled


def federated_curve(result: SimulationResult, metric: str = "dice_mean") -> Curve:
    """The job's score against epochs per site (see the module's notes per workflow).

    Raises ValueError for a job that did not finish or a metric the results do not hold.
    """
    if result.status != "done":
        raise ValueError(f"job {result.job.job_id} is {result.status}, not done: {result.reason}")
    _check_metric(result, metric)
    job = result.job
    counts = {site: data.validation_cases for site, data in result.data.items()}
    epochs = float(job.training.local_epochs)
    sites = len(job.sites)
    # One row per visit; a duplicate (a site that re-scored after a restart) counts once.
    arrivals = {
        (row.site, row.round, row.hop): row
        for row in result.history
        if row.stage == "received" and metric in row.metrics
    }
    # A deployed ring job's initial model is scored by its first site only: no start point.
    start = result.initial_overall.get(metric)
    points = [] if start is None else [(0.0, start)]
    if job.algorithm is Algorithm.FEDAVG:
        for round in sorted({round for _, round, _ in arrivals} - {0}):
            rows = [row for (_, r, _), row in arrivals.items() if r == round]
            points.append((round * epochs, _weighted(rows, counts, metric)))
    elif job.algorithm.is_ring:
        by_visit: dict[int, list[MetricsRow]] = {}
        for (_, round, hop), row in arrivals.items():
            by_visit.setdefault(round * sites + hop, []).append(row)
        # Visit 0 is the initial model at the first site; windows start a cycle in.
        for visit in range(sites, job.rounds * sites):
            window = [
                row for v in range(visit - sites + 1, visit + 1) for row in by_visit.get(v, [])
            ]
            if window:
                points.append((visit * epochs / sites, _weighted(window, counts, metric)))
    # Ensemble and SWT: nothing in between; the end of the budget (SWT's rounds is 1).
    points.append((job.rounds * epochs, result.final_overall[metric]))
    return Curve(tuple(x for x, _ in points), tuple(v for _, v in points))


def baseline_curve(result: SimulationResult, method: str, metric: str = "dice_mean") -> Curve:
    """A baseline's score against epochs per site, from results run with ``baselines``."""
    if method not in result.baselines:
        available = sorted(result.baselines) or "none: simulate with baselines"
        raise ValueError(f"no {method!r} baseline in these results; they hold {available}")
    _check_metric(result, metric)
    summary = result.baselines[method]
    epochs = float(result.job.training.local_epochs)
    xs = [0.0] + [(r + 1) * epochs for r in range(len(summary.overall_by_round))]
    values = [result.initial_overall[metric]] + [s[metric] for s in summary.overall_by_round]
    return Curve(tuple(xs), tuple(values))


def _check_metric(result: SimulationResult, metric: str) -> None:
    if not metric.startswith("dice_") or metric not in result.final_overall:
        available = sorted(k for k in result.final_overall if k.startswith("dice_"))
        raise ValueError(
            f"metric {metric!r} is not a Dice score these results hold; use one of {available}"
        )


def _weighted(rows: Sequence[MetricsRow], counts: dict[str, int], metric: str) -> float:
    total = sum(counts[row.site] for row in rows)
    return sum(row.metrics[metric] * counts[row.site] for row in rows) / total


@dataclass(frozen=True)
class Band:
    """One method's curves over several seeds, drawn as their mean with a ±1 std band."""

    label: str
    curves: Sequence[Curve]

    def __post_init__(self) -> None:
        if not self.curves:
            raise ValueError(f"band {self.label!r} has no curves; give it one per seed")

    def mean(self) -> Curve:
        """The mean over the seeds, at the points every seed's curve shares."""
        shared, columns = self._columns()
        return Curve(shared, tuple(statistics.fmean(column) for column in columns))

    def std(self) -> Curve:
        """The sample standard deviation over the seeds (0 for one seed), at the same points."""
        shared, columns = self._columns()
        spread = (statistics.stdev(column) if len(column) > 1 else 0.0 for column in columns)
        return Curve(shared, tuple(spread))

    def _columns(self) -> tuple[tuple[float, ...], list[list[float]]]:
        shared = tuple(sorted(set.intersection(*(set(c.epochs) for c in self.curves))))
        lookups = [dict(zip(c.epochs, c.values, strict=True)) for c in self.curves]
        return shared, [[lookup[x] for lookup in lookups] for x in shared]


Reference = tuple[float, str]
"""A horizontal line to read the curves against: its height and its legend label."""

_END_MARKERS = ("D", "s", "^", "v")


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (never a display); imported when first
    needed, since most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(
    panels: Sequence[tuple[str, Sequence[Band], Reference | None]],
    path: Path,
    *,
    xlabel: str = "epochs of training per site",
    ylabel: str = "mean Dice (WT, TC, ET)",
) -> None:
    """A PNG with one panel per ``(title, bands, reference)``: each band's mean curve with a
    shaded ±1 std, and the reference (if any) as a dashed line. A band with no points between
    start and end (an ensemble, SWT) is drawn as its end point with a ±1 std error bar, each
    with its own marker."""
    plt = pyplot()
    figure, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False, sharey=True
    )
    for axis, (title, bands, reference) in zip(axes[0], panels, strict=True):
        ends = iter(_END_MARKERS * len(bands))
        for band in bands:
            mean, std = band.mean(), band.std()
            if not mean.has_progress:
                axis.errorbar(
                    mean.epochs[-1:],
                    mean.values[-1:],
                    yerr=std.values[-1:],
                    fmt=next(ends),
                    capsize=4,
                    label=f"{band.label} (end only)",
                )
                continue
            low = [m - s for m, s in zip(mean.values, std.values, strict=True)]
            high = [m + s for m, s in zip(mean.values, std.values, strict=True)]
            (line,) = axis.plot(
                mean.epochs, mean.values, marker="o", markersize=3, label=band.label
            )
            axis.fill_between(mean.epochs, low, high, color=line.get_color(), alpha=0.15)
        if reference is not None:
            height, label = reference
            axis.axhline(height, color="grey", linestyle="--", linewidth=1, label=label)
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
