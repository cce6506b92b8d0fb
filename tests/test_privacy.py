"""Differential privacy at the sites: clipping and Gaussian noise on every model sent, and
the accountant's ε, checked against Google's dp-accounting library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, rdp

from node.simulate import SimulationConfig, simulate
from relay.aggregation import update_norm
from relay.errors import ConfigError
from relay.jobspec import Algorithm, JobSpec, PrivacySpec
from relay.privacy import (
    ORDERS,
    SENSITIVITY,
    epsilon,
    gaussian,
    privatize,
    release_key,
    releases,
    site_secret,
)
from tests.test_workflows import TINY


@pytest.mark.parametrize(
    ("noise", "count", "delta"),
    [(1.0, 10, 1e-5), (2.0, 50, 1e-6), (0.8, 1, 1e-5), (5.0, 200, 1e-5)],
)
def test_epsilon_matches_google_dp_accounting_for_the_gaussian_mechanism(
    noise: float, count: int, delta: float
) -> None:
    # Sensitivity 2 x clip norm: any two data sets of a site (see relay.privacy).
    reference = rdp.RdpAccountant(orders=list(ORDERS))
    reference.compose(dp_event.GaussianDpEvent(noise / SENSITIVITY), count)
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
    key = release_key(b"s" * 32, job_id="j", round=0, hop=0)
    sent = privatize(reference, trained, spec, key=key)
    noise = sent["w"] - torch.full((200_000,), 2.0 / 200_000**0.5)  # minus the clipped update
    assert float(noise.std()) == pytest.approx(1.0, rel=0.01)  # 0.5 x clip norm 2
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert sent["steps"] == 9 and torch.equal(trained["w"], torch.full((200_000,), 0.1))
    barely = PrivacySpec(clip_norm=2.0, noise_multiplier=1e-9)
    assert update_norm(reference, privatize(reference, trained, barely, key=key)) == pytest.approx(
        2.0
    )


def test_the_noise_is_normal_and_the_same_only_for_the_same_release() -> None:
    draws = gaussian(100_001, bytes(32))
    assert draws.shape == (100_001,) and bool(torch.isfinite(draws).all())
    assert float(draws.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(draws.std()) == pytest.approx(1.0, rel=0.02)
    assert float((draws.abs() > 1.96).double().mean()) == pytest.approx(0.05, abs=0.005)
    secret = b"k" * 32
    same = release_key(secret, job_id="j", round=3, hop=1)
    assert same == release_key(secret, job_id="j", round=3, hop=1)  # a resend: same bytes
    others = {
        release_key(secret, job_id="j", round=4, hop=1),
        release_key(secret, job_id="j", round=3, hop=2),
        release_key(secret, job_id="k", round=3, hop=1),
        release_key(b"x" * 32, job_id="j", round=3, hop=1),
    }
    assert same not in others and len(others) == 4


def test_a_sites_noise_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    secret = site_secret(tmp_path)
    assert len(secret) == 32 and site_secret(tmp_path) == secret
    assert (tmp_path / "privacy.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "privacy.key").write_bytes(b"short")
    with pytest.raises(ConfigError, match=r"holds 5 bytes.*move it aside"):
        site_secret(tmp_path)


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
        assert "loss" not in row.metrics  # computed from the un-noised model: it stays home
    assert set(result.privacy) == set(config.site_names())
    assert all(p.epsilon == epsilon(2, spec) and p.delta == 1e-6 for p in result.privacy.values())
    # The same seed without privacy gives one model every time; with it, the noise is secret.
    again = simulate(config, tmp_path / "b")
    assert again.model_sha256 != result.model_sha256
    assert result.final_overall["dice_mean"] > result.initial_overall["dice_mean"]


def test_a_private_ring_spends_one_release_a_visit_and_the_ensemble_one_in_all(
    tmp_path: Path,
) -> None:
    private = {"dp_clip_norm": 5.0, "dp_noise_multiplier": 1e-4, "local_epochs": 1}
    for job, expected in (
        ({"algorithm": "cwt", "rounds": 2}, 2),
        ({"algorithm": "ensemble", "rounds": 2}, 1),
    ):
        config = SimulationConfig.model_validate({**TINY, **private, **job})
        result = simulate(config, tmp_path / str(job["algorithm"]))
        assert result.status == "done", result.reason
        spec = config.job().privacy
        assert spec is not None
        trained = [row for row in result.history if row.stage == "trained"]
        # The ensemble's passes before the last never leave the site, nor do their scores.
        assert len(trained) == len(config.site_names()) * (2 if job["algorithm"] == "cwt" else 1)
        assert {p.epsilon for p in result.privacy.values()} == {epsilon(expected, spec)}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"dp_clip_norm": 1.0}, "needs both 'dp_clip_norm' and 'dp_noise_multiplier'"),
        ({"dp_delta": 1e-6}, "'dp_delta' is for differential privacy"),
        ({"trim_fraction": 0.4}, "'trim_fraction' is for aggregation trimmed-mean only"),
    ],
)
def test_settings_the_job_would_ignore_are_refused(settings: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        SimulationConfig.model_validate(settings)
