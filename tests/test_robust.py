"""Robust FedAvg against a hostile site: coordinate-wise median, trimmed mean, update clipping.

Five sites train a tiny network for real; one of them sends its weights scaled by -5 (sign
flipped and blown up) and claims ten times its cases. Plain FedAvg collapses; the robust
aggregators stay within 5% of the clean run's Dice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.algo import Scores, SiteAlgo, TrainResult
from node.models import initial_weights
from node.simulate import Federation, SimulationConfig, weighted_overall
from relay.aggregation import update_norm
from relay.codec import StateDict
from relay.jobspec import JobSpec
from relay.workflows.state import JobState, Status
from tests.test_workflows import TINY

SITES = 5
HOSTILE = "site-5"


@dataclass
class Hostile:
    """A site that trains honestly, then sends its weights times -5 and inflates its count."""

    inner: SiteAlgo

    @property
    def train_count(self) -> int:
        return self.inner.train_count

    @property
    def validation_count(self) -> int:
        return self.inner.validation_count

    def train(self, weights: StateDict, *, epochs: int, job_id: str, round: int) -> TrainResult:
        honest = self.inner.train(weights, epochs=epochs, job_id=job_id, round=round)
        poisoned = {
            name: -5 * tensor if tensor.is_floating_point() else tensor
            for name, tensor in honest.weights.items()
        }
        return TrainResult(poisoned, honest.sample_count * 10, honest.loss)

    def evaluate(self, members: Sequence[StateDict]) -> Scores:
        return self.inner.evaluate(members)

    def finalize(self, job_id: str) -> None:
        self.inner.finalize(job_id)


def _run(
    tmp_path: Path, *, hostile: bool, at: str = HOSTILE, **job: object
) -> tuple[float, JobState]:
    settings = {"algorithm": "fedavg", "sites": SITES, "rounds": 4, "local_epochs": 2}
    config = SimulationConfig.model_validate({**TINY, **settings, **job})
    federation = Federation.build(config, tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
    if hostile:
        site = next(s for s in federation.sites if s.name == at)
        honest_factory = site.algo_factory

        def make(spec: JobSpec) -> SiteAlgo:
            return Hostile(honest_factory(spec))

        site.algo_factory = make
    try:
        state = federation.run(config.job())
    finally:
        federation.close()
    assert state.status is Status.DONE, state.reason
    counts = {name: data.validation_cases for name, data in federation.data.items()}
    return weighted_overall(state.final_metrics, counts)["dice_mean"], state


@pytest.mark.slow
def test_median_and_trimmed_mean_withstand_a_hostile_site_that_breaks_plain_fedavg(
    tmp_path: Path,
) -> None:
    clean, _ = _run(tmp_path, hostile=False)
    attacked, _ = _run(tmp_path, hostile=True)
    median, _ = _run(tmp_path, hostile=True, aggregation="median")
    trimmed, _ = _run(tmp_path, hostile=True, aggregation="trimmed-mean", trim_fraction=0.2)
    assert clean > 0.5, clean  # the clean run learned something worth defending
    assert attacked < 0.5 * clean, (attacked, clean)
    assert median >= 0.95 * clean, (median, clean)
    assert trimmed >= 0.95 * clean, (trimmed, clean)


@pytest.mark.slow
def test_clipping_bounds_how_far_a_hostile_site_moves_the_model_and_records_it(
    tmp_path: Path,
) -> None:
    limit = 3.0  # honest updates of this tiny network are about 1.6-2.5 long
    _, unclipped = _run(tmp_path, hostile=True)
    _, clipped = _run(tmp_path, hostile=True, max_update_norm=limit)
    for record in clipped.rounds:
        assert set(record.clipped) == {HOSTILE} and record.clipped[HOSTILE] > limit
    # Every round's aggregate is a mean of updates no longer than the limit.
    initial = initial_weights(clipped.spec.model, seed=clipped.spec.seed)
    moved = update_norm(initial, clipped.final[0])
    assert moved <= clipped.spec.rounds * limit < update_norm(initial, unclipped.final[0])


@pytest.mark.slow
def test_the_ring_gate_refuses_a_hostile_sites_hops_and_records_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ring = {"algorithm": "cwt", "rounds": 3}
    clean, _ = _run(tmp_path, hostile=False, **ring)
    attacked, _ = _run(tmp_path, hostile=True, at="site-3", **ring)
    caplog.clear()
    gated, state = _run(tmp_path, hostile=True, at="site-3", ring_gate=0.1, **ring)
    # Every hop but the first was judged against its reference, except the one after a
    # refusal: site-4 trained another model than site-3 was sent, and site-5 holds no copy.
    unchecked = [r.message for r in caplog.records if "unchecked" in r.message]
    assert len(unchecked) == 3, unchecked
    assert all("site-5: the reference is not the model" in m for m in unchecked), unchecked
    assert not [r.message for r in caplog.records if "dead-letters" in r.message]
    assert attacked < 0.5 * clean, (attacked, clean)
    # Every hop after the hostile site is refused, in every cycle, and nothing else is.
    assert [(r.site, r.sender, r.cycle) for r in state.refused] == [
        ("site-4", "site-3", cycle) for cycle in range(3)
    ]
    assert all(r.dice_mean < r.reference_dice_mean - 0.1 for r in state.refused)
    assert gated >= 0.95 * clean, (gated, clean)


def test_robust_options_are_refused_where_they_cannot_apply() -> None:
    with pytest.raises(ValueError, match="'ring_gate' applies to swt and cwt only, not fedavg"):
        SimulationConfig.model_validate({"algorithm": "fedavg", "ring_gate": 0.1})
    with pytest.raises(ValueError, match="apply to fedavg only, not cwt"):
        SimulationConfig.model_validate({"algorithm": "cwt", "aggregation": "median"})
    with pytest.raises(ValueError, match=r"of 3 sites \(the round's quorum\) trims no site"):
        SimulationConfig.model_validate({"aggregation": "trimmed-mean", "trim_fraction": 0.2})
    # The value the error suggests is accepted.
    SimulationConfig.model_validate({"aggregation": "trimmed-mean", "trim_fraction": 0.334})
    # A round closed at a quorum of 4 of 5 sites must still trim one.
    quorum = {"sites": 5, "min_sites": 4, "aggregation": "trimmed-mean", "trim_fraction": 0.2}
    with pytest.raises(ValueError, match="of 4 sites"):
        SimulationConfig.model_validate(quorum)
    with pytest.raises(ValueError, match="median of 2 site"):
        SimulationConfig.model_validate({"sites": 2, "aggregation": "median"})
