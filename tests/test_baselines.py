"""Centralized and local-only references, trained on the federation's own data and budget."""

from __future__ import annotations

from pathlib import Path

from node.simulate import SimulationConfig, simulate
from tests.test_workflows import TINY


def test_a_simulation_reports_its_centralized_and_local_references(tmp_path: Path) -> None:
    config = SimulationConfig.model_validate(
        {"algorithm": "fedavg", "rounds": 3, "local_epochs": 2, "baselines": True, **TINY}
    )
    result = simulate(config, tmp_path)
    assert result.status == "done"
    central, local = result.baselines["centralized"], result.baselines["local"]
    sites = set(config.site_names())
    # The same budget (one entry per round) and the same validation cases as the federation.
    assert len(central.overall_by_round) == len(local.overall_by_round) == config.rounds
    assert set(central.final) == set(local.final) == sites
    untrained = result.initial_overall["dice_mean"]
    assert central.final_overall["dice_mean"] > untrained + 0.2
    assert local.final_overall["dice_mean"] > untrained + 0.1  # fewer cases each
    # The best single local model is one site's, scored over every site's cases.
    assert local.best_single in sites and local.best_single_overall is not None
    assert 0.0 < local.best_single_overall["dice_mean"] <= 1.0
    assert (tmp_path / "results.json").read_text().count('"centralized"') == 1
