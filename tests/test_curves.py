"""Score-against-budget curves from a simulation's results, their plot, and the benchmark
that compares the workflows with them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.curves import Band, Curve, baseline_curve, federated_curve, plot
from node.simulate import SimulationConfig, SimulationResult, simulate
from tests.test_workflows import TINY

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path_factory: pytest.TempPathFactory, **job: object) -> SimulationResult:
    config = SimulationConfig.model_validate({**TINY, **job})
    result = simulate(config, tmp_path_factory.mktemp("sim"))
    assert result.status == "done", result.reason
    return result


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return _run(tmp_path_factory, algorithm="fedavg", rounds=3, local_epochs=2, baselines=True)


def test_a_fedavg_curve_has_a_point_per_round_weighted_by_validation_cases(
    fedavg: SimulationResult,
) -> None:
    curve = federated_curve(fedavg)
    assert curve.epochs == (0.0, 2.0, 4.0, 6.0)
    assert curve.values[0] == fedavg.initial_overall["dice_mean"]
    assert curve.values[-1] == fedavg.final_overall["dice_mean"]
    counts = {site: data.validation_cases for site, data in fedavg.data.items()}
    rows = [r for r in fedavg.history if r.stage == "received" and r.round == 2]
    assert {r.site for r in rows} == set(counts)
    expected = sum(r.metrics["dice_mean"] * counts[r.site] for r in rows) / sum(counts.values())
    assert curve.values[2] == pytest.approx(expected)


def test_baseline_curves_follow_their_rounds(fedavg: SimulationResult) -> None:
    for method in ("centralized", "local"):
        curve = baseline_curve(fedavg, method)
        by_round = fedavg.baselines[method].overall_by_round
        assert curve.epochs == (0.0, 2.0, 4.0, 6.0)
        assert curve.values[1:] == tuple(s["dice_mean"] for s in by_round)
    with pytest.raises(ValueError, match=r"no 'federated' baseline.*centralized"):
        baseline_curve(fedavg, "federated")


def test_a_curve_settles_only_where_it_stays_above_the_target() -> None:
    curve = Curve((0.0, 1.0, 2.0, 3.0, 4.0), (0.1, 0.9, 0.7, 0.92, 0.95))
    assert curve.settles_at(0.9) == 3.0  # touching 0.9 at 1.0 and falling back does not count
    assert curve.settles_at(0.1) == 0.0
    assert curve.settles_at(0.96) is None
    assert curve.has_progress and not Curve((0.0, 4.0), (0.1, 0.9)).has_progress


def test_bad_requests_for_a_curve_name_what_is_wrong(fedavg: SimulationResult) -> None:
    with pytest.raises(ValueError, match=r"'hd95_wt' is not a Dice score.*dice_mean"):
        federated_curve(fedavg, "hd95_wt")
    with pytest.raises(ValueError, match="'dice_xx'"):
        baseline_curve(fedavg, "centralized", "dice_xx")
    failed = fedavg.model_copy(update={"status": "failed", "reason": "site-2 never answered"})
    with pytest.raises(ValueError, match="is failed, not done: site-2 never answered"):
        federated_curve(failed)
    with pytest.raises(ValueError, match="band 'x' has no curves"):
        Band("x", [])


def test_a_ring_curve_averages_a_whole_cycle_of_arrivals(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    result = _run(tmp_path_factory, algorithm="cwt", rounds=2, local_epochs=1)
    sites = len(result.job.sites)
    curve = federated_curve(result)
    # Visits 0 … 2K-1; windows of K end at K … 2K-1, then the final score.
    assert curve.epochs == (0.0, *(i / sites for i in range(sites, 2 * sites)), 2.0)
    counts = {site: data.validation_cases for site, data in result.data.items()}
    arrivals = sorted(
        (r for r in result.history if r.stage == "received"), key=lambda r: (r.round, r.hop)
    )
    window = arrivals[1 : sites + 1]
    assert {r.site for r in window} == set(counts)
    expected = sum(r.metrics["dice_mean"] * counts[r.site] for r in window)
    assert curve.values[1] == pytest.approx(expected / sum(counts.values()))
    # A visit scored twice (a site restarted) counts once; a lost score leaves the window short.
    repeated = result.model_copy(update={"history": [*result.history, arrivals[2]]})
    assert federated_curve(repeated) == curve
    lost = result.model_copy(update={"history": [r for r in result.history if r != arrivals[2]]})
    shorter = federated_curve(lost)
    assert shorter.epochs == curve.epochs and shorter.values[0] == curve.values[0]


def test_swt_and_the_ensemble_have_only_their_end_points(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    for job in (
        {"algorithm": "swt", "local_epochs": 3},
        {"algorithm": "ensemble", "rounds": 3, "local_epochs": 1},
    ):
        result = _run(tmp_path_factory, **job)
        curve = federated_curve(result)
        assert curve.epochs == (0.0, 3.0), job
        assert curve.values == (
            result.initial_overall["dice_mean"],
            result.final_overall["dice_mean"],
        )


def test_bands_average_seeds_and_the_plot_is_written(tmp_path: Path) -> None:
    band = Band("m", [Curve((0.0, 1.0, 2.0), (0.0, 0.5, 0.9)), Curve((0.0, 2.0), (0.2, 0.7))])
    assert band.mean() == Curve((0.0, 2.0), (0.1, 0.8))
    assert band.std().values == pytest.approx((0.1414, 0.1414), abs=1e-4)  # sample std
    assert Band("one", [Curve((0.0, 2.0), (0.2, 0.7))]).std().values == (0.0, 0.0)
    single = Band("point", [Curve((0.0, 2.0), (0.0, 0.6))])
    target = tmp_path / "plots" / "curves.png"
    plot([("a", [band, single], (0.5, "95%")), ("b", [band], None)], target)
    assert target.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_the_workflow_benchmark_writes_its_table_plot_and_records(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "bench/federated.py",
        "--settings=similar",
        "--seeds=0",
        "--rounds=2",
        "--volume-size=16",
        "--width=4",
        f"--output={tmp_path}",
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "federated.md").read_text()
    methods = {
        "centralized", "local only", "best single local", "ensemble", "swt", "cwt", "fedavg",
        "fedavg + DP",
    }  # fmt: skip
    for method in methods:
        assert f"| {method} |" in table
    assert "fedavg ≥ 0.97 × centralized" in table and table in done.stdout
    assert "the cost of differential privacy" in table
    assert (tmp_path / "federated.png").read_bytes().startswith(PNG_MAGIC)
    record = json.loads((tmp_path / "federated.json").read_text())
    assert record["plan"]["rounds"] == 2 and record["plan"]["seeds"] == [0]
    records = record["runs"]
    assert {r["method"] for r in records} == methods
    moved = {r["method"]: r["megabytes"] for r in records}
    assert moved["fedavg"] > moved["swt"] > 0  # a round trip per site per round vs one pass
    spent = {r["method"]: r["epsilon"] for r in records}
    assert spent["fedavg + DP"] > 0 and spent["fedavg"] is None


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("--settings=simlar", "unknown: ['simlar']"),
        ("--settings=similar,similar", "distinct settings"),
        ("--seeds=0,0", "distinct seeds"),
        ("--rounds=0", "0 is not a positive integer"),
        ("--volume-size=18", "'volume_size' 18 must be a multiple of 4"),
    ],
)
def test_the_benchmark_refuses_bad_options_before_any_work(
    option: str, named: str, tmp_path: Path
) -> None:
    command = [sys.executable, "bench/federated.py", option, f"--output={tmp_path / 'never'}"]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert not (tmp_path / "never").exists()
