"""The phantom generator: deterministic, nested labels, MR-like contrasts, distinct sites."""

from __future__ import annotations

import pytest
import torch

from node.phantom import MODALITIES, REGIONS, SiteProfile, generate_cases, site_profiles
from relay.errors import ConfigError

SIZE = 24


@pytest.fixture(scope="module")
def cases() -> tuple[torch.Tensor, torch.Tensor]:
    return generate_cases(SiteProfile(cases=6, bias=0.2, noise=0.05), size=SIZE, seed=7)


def test_cases_have_brats_shapes_and_float32_binary_labels(
    cases: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = cases
    assert images.shape == (6, len(MODALITIES), SIZE, SIZE, SIZE)
    assert labels.shape == (6, len(REGIONS), SIZE, SIZE, SIZE)
    assert images.dtype == labels.dtype == torch.float32
    assert ((labels == 0) | (labels == 1)).all()
    assert torch.isfinite(images).all()


def test_same_seed_gives_identical_cases(cases: tuple[torch.Tensor, torch.Tensor]) -> None:
    again = generate_cases(SiteProfile(cases=6, bias=0.2, noise=0.05), size=SIZE, seed=7)
    assert torch.equal(cases[0], again[0])
    assert torch.equal(cases[1], again[1])


def test_different_seed_gives_different_cases(cases: tuple[torch.Tensor, torch.Tensor]) -> None:
    other = generate_cases(SiteProfile(cases=6, bias=0.2, noise=0.05), size=SIZE, seed=8)
    assert not torch.equal(cases[0], other[0])
    assert not torch.equal(cases[1], other[1])


def test_regions_are_nested_and_every_case_has_enhancing_tumour(
    cases: tuple[torch.Tensor, torch.Tensor],
) -> None:
    _, labels = cases
    wt, tc, et = labels[:, 0], labels[:, 1], labels[:, 2]
    assert (et <= tc).all()
    assert (tc <= wt).all()
    # Strictly nested too: oedema around the core, necrosis inside the rim.
    assert (wt.sum(dim=(1, 2, 3)) > tc.sum(dim=(1, 2, 3))).all()
    assert (tc.sum(dim=(1, 2, 3)) > et.sum(dim=(1, 2, 3))).all()
    assert (et.sum(dim=(1, 2, 3)) >= 20).all()


def test_images_are_z_normalised_inside_the_brain_and_zero_outside(
    cases: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = cases
    brain = images.abs().sum(dim=1) > 0
    assert (labels.amax(dim=1).bool() <= brain).all(), "tumour outside the brain"
    for case in range(images.shape[0]):
        inside = images[case][:, brain[case]]
        torch.testing.assert_close(inside.mean(dim=1), torch.zeros(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(inside.std(dim=1), torch.ones(4), atol=1e-2, rtol=0)


def test_tumour_regions_show_mr_like_contrasts(cases: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = cases
    brain = images.abs().sum(dim=1) > 0
    wt, tc, et = labels[:, 0].bool(), labels[:, 1].bool(), labels[:, 2].bool()
    oedema, healthy = wt & ~tc, brain & ~wt
    flair, t1, t1ce, t2 = (images[:, c] for c in range(4))
    assert flair[oedema].mean() > flair[healthy].mean() + 1.0
    assert t2[oedema].mean() > t2[healthy].mean() + 1.0
    assert t1ce[et].mean() > t1ce[healthy].mean() + 1.5
    assert t1[tc].mean() < t1[healthy].mean() - 1.0


def test_site_profiles_are_deterministic_and_differ() -> None:
    profiles = site_profiles(4, seed=3, cases_per_site=10)
    assert profiles == site_profiles(4, seed=3, cases_per_site=10)
    assert profiles != site_profiles(4, seed=4, cases_per_site=10)
    assert len(profiles) == 4
    for knob in ("contrast", "bias", "noise", "lesion_scale"):
        assert len({getattr(p, knob) for p in profiles}) == 4, knob
    for p in profiles:
        assert 8 <= p.cases <= 12
        assert 0.8 <= p.contrast <= 1.2
        assert 0.0 <= p.bias <= 0.3
        assert 0.02 <= p.noise <= 0.1
        assert 0.7 <= p.lesion_scale <= 1.3


def test_site_profiles_never_go_below_four_cases() -> None:
    assert all(p.cases >= 4 for p in site_profiles(20, seed=0, cases_per_site=4))


def test_sites_with_different_profiles_get_differently_distributed_images() -> None:
    low, high = (
        SiteProfile(cases=4, noise=0.02, lesion_scale=0.7),
        SiteProfile(cases=4, noise=0.1, lesion_scale=1.3),
    )
    _, small = generate_cases(low, size=SIZE, seed=1)
    _, large = generate_cases(high, size=SIZE, seed=1)
    assert large[:, 1].sum() > 2 * small[:, 1].sum()


@pytest.mark.parametrize(
    ("field", "value"),
    [("cases", 0), ("contrast", 0.0), ("bias", -0.1), ("noise", -1.0), ("lesion_scale", 0.0)],
)
def test_profile_refuses_impossible_values(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        SiteProfile(**{"cases": 4, field: value})  # type: ignore[arg-type]


def test_too_small_a_volume_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="size"):
        generate_cases(SiteProfile(cases=4), size=4, seed=0)


def test_brats_split_shares_cases_in_the_institutions_proportions() -> None:
    profiles = site_profiles(10, seed=0, cases_per_site=20, split="brats")
    counts = [p.cases for p in profiles]
    assert counts[0] == round(200 * 70 / 165) and counts[-1] == max(4, round(200 * 3 / 165))
    assert counts == sorted(counts, reverse=True)
    assert abs(sum(counts) - 200) <= 10


def test_heterogeneity_narrows_how_far_sites_differ() -> None:
    alike = site_profiles(4, seed=3, cases_per_site=10, heterogeneity=0.0)
    assert {(p.contrast, p.bias, p.noise, p.lesion_scale) for p in alike} == {
        (1.0, 0.15, 0.06, 1.0)
    }
    similar = site_profiles(4, seed=3, cases_per_site=10, heterogeneity=0.25)
    assert all(0.95 <= p.contrast <= 1.05 and 0.9 <= p.lesion_scale <= 1.1 for p in similar)
    assert len({p.contrast for p in similar}) == 4
    with pytest.raises(ConfigError, match="heterogeneity"):
        site_profiles(4, seed=3, heterogeneity=1.5)
