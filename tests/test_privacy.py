"""Differential privacy at the sites: clipping and Gaussian noise on every model sent, and
the accountant's ε, checked against Google's dp-accounting library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, rdp

from node.simulate import SimulationConfig, simulate
from relay.aggregation import update_norm
from relay.jobspec import Algorithm, JobSpec, PrivacySpec
from relay.privacy import ORDERS, epsilon, privatize, releases
from tests.test_workflows import TINY


@pytest.mark.parametrize(
    ("noise", "count", "delta"),
    [(1.0, 10, 1e-5), (2.0, 50, 1e-6), (0.8, 1, 1e-5), (5.0, 200, 1e-5)],
)
def test_epsilon_matches_google_dp_accounting_for_the_gaussian_mechanism(
    noise: float, count: int, delta: float
) -> None:
    reference = rdp.RdpAccountant(orders=list(ORDERS))
    reference.compose(dp_event.GaussianDpEvent(noise), count)
    spec = PrivacySpec(clip_norm=1.0, noise_multiplier=noise, delta=delta)
    assert epsilon(count, spec) == pytest.approx(reference.get_epsilon(delta), rel=1e-9)


def test_more_releases_cost_more_and_more_noise_costs_less() -> None:
    spec = PrivacySpec(clip_norm=1.0, noise_multiplier=1.0)
    assert epsilon(1, spec) < epsilon(10, spec)
    quieter = PrivacySpec(clip_norm=1.0, noise_multiplier=4.0)
    assert epsilon(10, quieter) < epsilon(10, spec)
    with pytest.raises(ValueError, match="releases must be at least 1"):
        epsilon(0, spec)


def test_a_sent_model_is_clipped_and_noised_with_the_stated_spread() -> None:
    reference = {"w": torch.zeros(200_000), "steps": torch.tensor(7)}
    trained = {"w": torch.full((200_000,), 0.1), "steps": torch.tensor(9)}  # update norm ~44.7
    spec = PrivacySpec(clip_norm=2.0, noise_multiplier=0.5)
    generator = torch.Generator().manual_seed(0)
    sent = privatize(reference, trained, spec, generator=generator)
    noise = sent["w"] - torch.full((200_000,), 2.0 / 200_000**0.5)  # minus the clipped update
    assert float(noise.std()) == pytest.approx(1.0, rel=0.01)  # 0.5 x clip norm 2
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert sent["steps"] == 9 and torch.equal(trained["w"], torch.full((200_000,), 0.1))
    barely = PrivacySpec(clip_norm=2.0, noise_multiplier=1e-9)
    assert update_norm(reference, privatize(reference, trained, barely)) == pytest.approx(2.0)
    # Without a generator, the noise is secret: never the same twice.
    assert not torch.equal(
        privatize(reference, trained, spec)["w"], privatize(reference, trained, spec)["w"]
    )


@pytest.mark.parametrize(
    ("algorithm", "rounds", "expected"),
    [
        (Algorithm.FEDAVG, 3, 3),
        (Algorithm.CWT, 3, 3),
        (Algorithm.SWT, 1, 1),
        (Algorithm.ENSEMBLE, 3, 1),
    ],
)
def test_a_site_releases_one_model_a_round_or_a_visit(
    algorithm: Algorithm, rounds: int, expected: int
) -> None:
    job = JobSpec(algorithm=algorithm, sites=("a", "b"), rounds=rounds)
    assert releases(job, round=rounds - 1) == expected


def test_a_private_fedavg_job_reports_each_sites_epsilon_every_round(tmp_path: Path) -> None:
    settings = {"algorithm": "fedavg", "rounds": 2, "local_epochs": 1}
    private = {"dp_clip_norm": 5.0, "dp_noise_multiplier": 1e-4, "dp_delta": 1e-6}
    config = SimulationConfig.model_validate({**TINY, **settings, **private})
    result = simulate(config, tmp_path / "a")
    assert result.status == "done", result.reason
    spec = config.job().privacy
    assert spec is not None
    trained = [row for row in result.history if row.stage == "trained"]
    assert {(row.site, row.round) for row in trained} == {
        (site, r) for site in config.site_names() for r in (0, 1)
    }
    for row in trained:
        assert row.metrics["epsilon"] == pytest.approx(epsilon(row.round + 1, spec))
    assert set(result.privacy) == set(config.site_names())
    assert all(p.epsilon == epsilon(2, spec) and p.delta == 1e-6 for p in result.privacy.values())
    # The same seed without privacy gives one model every time; with it, the noise is secret.
    again = simulate(config, tmp_path / "b")
    assert again.model_sha256 != result.model_sha256
    assert result.final_overall["dice_mean"] > result.initial_overall["dice_mean"]


def test_privacy_needs_both_its_settings() -> None:
    with pytest.raises(ValueError, match="needs both 'dp_clip_norm' and 'dp_noise_multiplier'"):
        SimulationConfig.model_validate({"dp_clip_norm": 1.0})
