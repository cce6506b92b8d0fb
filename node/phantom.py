"""Synthetic multi-modal brain-tumour volumes, so a demo or a test needs no patient data.

Each case is a brain-like ellipsoid with an irregular surface, grey and white matter,
ventricles, and one glioma-like lesion: a necrotic core inside an enhancing rim, inside a
larger irregular oedema. Channels and labels follow BraTS / the Medical Segmentation
Decathlon (Task01): images are FLAIR, T1, T1ce, T2; labels are the nested regions whole
tumour (WT) ⊇ tumour core (TC) ⊇ enhancing tumour (ET).

A :class:`SiteProfile` stands for one hospital's scanner and population, so that sites of a
federation see differently distributed data, as they would in practice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import interpolate

from node.options import CaseSplit
from relay.errors import ConfigError

MODALITIES = ("flair", "t1", "t1ce", "t2")
"""Image channels, in the BraTS / MSD order."""

REGIONS = ("wt", "tc", "et")
"""Label channels: whole tumour, tumour core, enhancing tumour (each contains the next)."""

_WHITE, _GREY, _CSF, _OEDEMA, _NECROSIS, _ENHANCING = range(1, 7)

# Relative intensity of each tissue (rows; row 0 is background) in each modality (columns),
# chosen to give the contrasts a radiologist expects: FLAIR shows oedema bright and CSF dark,
# T1ce shows the enhancing rim brightest, T2 shows CSF and oedema bright, T1 shows the
# tumour core darker than white matter.
_INTENSITY = torch.tensor(
    [
        # FLAIR  T1    T1ce  T2
        [0.00, 0.00, 0.00, 0.00],  # background
        [0.55, 0.80, 0.80, 0.35],  # white matter
        [0.65, 0.60, 0.62, 0.50],  # grey matter
        [0.10, 0.20, 0.20, 1.00],  # CSF
        [1.00, 0.50, 0.52, 0.85],  # oedema
        [0.45, 0.25, 0.30, 0.95],  # necrotic core
        [0.80, 0.40, 1.10, 0.65],  # enhancing rim
    ]
)

_MIN_SIZE = 8


@dataclass(frozen=True)
class SiteProfile:
    """One site's data: how many cases, and how its scanner and patients differ from others'.

    ``contrast`` is a gamma on tissue intensities (~0.8-1.2; z-normalisation cannot undo it),
    ``bias`` the strength of a smooth multiplicative bias field (0-0.3), ``noise`` the Gaussian
    noise sigma relative to the mean brain intensity (~0.02-0.1), ``lesion_scale`` a factor on
    tumour size (~0.7-1.3).
    """

    cases: int
    contrast: float = 1.0
    bias: float = 0.0
    noise: float = 0.05
    lesion_scale: float = 1.0

    def __post_init__(self) -> None:
        checks = (
            ("cases", self.cases, self.cases >= 1, ">= 1"),
            ("contrast", self.contrast, self.contrast > 0, "> 0"),
            ("bias", self.bias, self.bias >= 0, ">= 0"),
            ("noise", self.noise, self.noise >= 0, ">= 0"),
            ("lesion_scale", self.lesion_scale, self.lesion_scale > 0, "> 0"),
        )
        for field, value, ok, expected in checks:
            if not ok:
                raise ConfigError(f"SiteProfile.{field} = {value!r}; expected {expected}")


# Ranges the profiles of a federation are spread over: wide enough that sites differ
# visibly, narrow enough that one model can still serve all of them.
_PROFILE_RANGES = {
    "contrast": (0.8, 1.2),
    "bias": (0.0, 0.3),
    "noise": (0.02, 0.1),
    "lesion_scale": (0.7, 1.3),
}


BRATS_PROPORTIONS = (70, 27, 17, 12, 11, 9, 6, 6, 4, 3)
"""Cases per institution in the multi-institutional BraTS data Sheller et al. (2020) split
by origin, largest first: a federation's sites are rarely of one size."""


def site_profiles(
    n_sites: int,
    *,
    seed: int,
    cases_per_site: int = 10,
    split: CaseSplit = "even",
    heterogeneity: float = 1.0,
) -> list[SiteProfile]:
    """Heterogeneous profiles for ``n_sites`` sites, the same for the same arguments.

    Every knob is stratified over its range (each site in a different slice, in shuffled
    order), so even two or three sites are guaranteed to differ. ``heterogeneity`` scales
    each range about its middle: 1 spreads sites over the whole range, 0.25 makes them
    similar, 0 gives every site the same scanner and lesion sizes. With the ``even`` split,
    case counts vary by about ±20% around ``cases_per_site``; with ``brats``, the
    ``n_sites * cases_per_site`` cases are shared in :data:`BRATS_PROPORTIONS` (repeated
    past ten sites), site-1 the largest. Never fewer than 4 cases a site.
    """
    if n_sites < 1:
        raise ConfigError(f"n_sites = {n_sites}; expected at least 1")
    if cases_per_site < 4:
        raise ConfigError(f"cases_per_site = {cases_per_site}; expected at least 4")
    if not 0.0 <= heterogeneity <= 1.0:
        raise ConfigError(f"heterogeneity = {heterogeneity}; expected a value in [0, 1]")
    gen = torch.Generator().manual_seed(seed)
    knobs: dict[str, list[float]] = {}
    for name, (low, high) in _PROFILE_RANGES.items():
        middle, half = (low + high) / 2, (high - low) / 2 * heterogeneity
        slots = torch.randperm(n_sites, generator=gen).double()
        fractions = (slots + torch.rand(n_sites, generator=gen, dtype=torch.float64)) / n_sites
        knobs[name] = [round(middle + half * (2 * f - 1), 4) for f in fractions.tolist()]
    spread = max(1, round(0.2 * cases_per_site))
    offsets = torch.randint(-spread, spread + 1, (n_sites,), generator=gen).tolist()
    counts = [cases_per_site + offset for offset in offsets]
    if split == "brats":
        shares = [BRATS_PROPORTIONS[i % len(BRATS_PROPORTIONS)] for i in range(n_sites)]
        counts = [round(n_sites * cases_per_site * s / sum(shares)) for s in shares]
    return [
        SiteProfile(
            cases=max(4, counts[i]),
            contrast=knobs["contrast"][i],
            bias=knobs["bias"][i],
            noise=knobs["noise"][i],
            lesion_scale=knobs["lesion_scale"][i],
        )
        for i in range(n_sites)
    ]


def generate_cases(
    profile: SiteProfile, *, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``profile.cases`` phantom cases of ``size``³ voxels, the same for the same arguments.

    Returns images ``[N, 4, S, S, S]`` (FLAIR, T1, T1ce, T2, each z-normalised inside the
    brain, 0 outside) and labels ``[N, 3, S, S, S]`` (WT ⊇ TC ⊇ ET, values 0/1), both float32.
    Give each site its own ``seed``: the seed alone fixes the anatomy.
    """
    if size < _MIN_SIZE:
        raise ConfigError(f"size = {size}; expected at least {_MIN_SIZE} voxels per side")
    gen = torch.Generator().manual_seed(seed)
    n = profile.cases
    shape = (size, size, size)

    def uniform(low: float, high: float, *dims: int) -> torch.Tensor:
        return low + (high - low) * torch.rand((n, *dims), generator=gen)

    def smooth(coarse: int, channels: int = 1) -> torch.Tensor:
        # Upsampled coarse noise: a cheap smooth random field, ~unit amplitude, whose
        # structure does not depend on the output size.
        noise = torch.randn((n, channels, coarse, coarse, coarse), generator=gen)
        field = interpolate(noise, size=shape, mode="trilinear", align_corners=True)
        return field if channels > 1 else field[:, 0]

    axis = torch.linspace(-1.0, 1.0, size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # [3, S, S, S]

    def scaled_distance(centre: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        # centre, radii: [N, 3] -> ellipsoidal distance [N, S, S, S]; 1 on the surface.
        offset = (grid[None] - centre[:, :, None, None, None]) / radii[:, :, None, None, None]
        return offset.square().sum(dim=1).sqrt()

    # Brain: an ellipsoid (longest front to back) with a randomly dented surface.
    brain_radii = torch.tensor([0.72, 0.90, 0.80]) + uniform(-0.04, 0.04, 3)
    brain_depth = scaled_distance(torch.zeros(n, 3), brain_radii) + 0.06 * smooth(5)
    brain = brain_depth < 1.0
    grey = brain & (brain_depth > 0.78 + 0.05 * smooth(6))

    # Ventricles: a mirrored pair of elongated ellipsoids near the middle.
    vent_scale = uniform(0.8, 1.2, 1)
    vent_radii = torch.tensor([0.10, 0.24, 0.07]) * vent_scale
    vent_centre = torch.tensor([0.05, 0.02, 0.12]) + uniform(-0.03, 0.03, 3)
    mirrored = grid.clone()
    mirrored[2] = mirrored[2].abs()
    vent_offset = (mirrored[None] - vent_centre[:, :, None, None, None]) / vent_radii[
        :, :, None, None, None
    ]
    csf = brain & (vent_offset.square().sum(dim=1) < 1.0)

    # Tumour: centre uniformly in the inner half of the brain, so most of it lies inside.
    direction = torch.randn((n, 3), generator=gen)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-6)
    depth = 0.55 * uniform(0.0, 1.0, 1) ** (1 / 3)
    centre = direction * depth * brain_radii
    core_radius = uniform(0.24, 0.34, 1) * profile.lesion_scale
    core_radii = core_radius * uniform(0.85, 1.15, 3)
    core_shape = scaled_distance(centre, core_radii)
    core_depth = core_shape + 0.15 * smooth(6)
    # The necrosis gets its own, milder perturbation: sharing the core's would leave the
    # rim thick on one side and missing on the other.
    necrosis_depth = core_shape + 0.06 * smooth(6)
    necrotic_fraction = uniform(0.5, 0.7)[:, None, None, None]
    oedema_radii = core_radii * uniform(1.4, 2.0, 1)
    oedema_depth = scaled_distance(centre, oedema_radii) + 0.3 * smooth(7)

    core = brain & (core_depth < 1.0)
    necrosis = core & (necrosis_depth < necrotic_fraction)
    enhancing = core & ~necrosis
    whole = core | (brain & (oedema_depth < 1.0))

    tissue = torch.zeros((n, *shape), dtype=torch.long)
    for label, mask in (
        (_WHITE, brain),
        (_GREY, grey),
        (_CSF, csf),
        (_OEDEMA, whole),
        (_NECROSIS, necrosis),
        (_ENHANCING, enhancing),
    ):
        tissue[mask] = label

    # Tissue intensities vary a little between patients; channels last, then moved.
    table = _INTENSITY[None] * (1.0 + 0.05 * torch.randn((n, *_INTENSITY.shape), generator=gen))
    cases = torch.arange(n)[:, None, None, None]
    images = table[cases, tissue].permute(0, 4, 1, 2, 3)
    images = images * (1.0 + 0.04 * smooth(8, channels=len(MODALITIES)))
    images = images.clamp_min(0.0) ** profile.contrast
    # tanh keeps the field within ±bias, the span a real receive-coil inhomogeneity has.
    images = images * (1.0 + profile.bias * torch.tanh(smooth(3)))[:, None]

    inside = brain[:, None].float()
    count = inside.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)
    level = (images * inside).sum(dim=(2, 3, 4), keepdim=True) / count
    images = images + profile.noise * level * torch.randn(images.shape, generator=gen)

    # Skull-stripped and z-normalised inside the brain, as BraTS pipelines do.
    mean = (images * inside).sum(dim=(2, 3, 4), keepdim=True) / count
    var = ((images - mean).square() * inside).sum(dim=(2, 3, 4), keepdim=True) / count
    images = (images - mean) / var.sqrt().clamp_min(1e-6) * inside

    labels = torch.stack((whole, core, enhancing), dim=1).float()
    return images.float().contiguous(), labels.contiguous()


def federation_site(
    *,
    seed: int,
    index: int,
    sites: int,
    cases_per_site: int,
    size: int,
    split: CaseSplit = "even",
    heterogeneity: float = 1.0,
) -> tuple[SiteProfile, torch.Tensor, torch.Tensor]:
    """Phantom site ``index`` of a federation of ``sites``: its profile, images and labels.

    The same arguments give the same data in any process, so a site process and the
    in-process simulation of the same federation train on identical cases.
    """
    if not 0 <= index < sites:
        raise ConfigError(f"phantom site index {index} is outside 0..{sites - 1}")
    profiles = site_profiles(
        sites, seed=seed, cases_per_site=cases_per_site, split=split, heterogeneity=heterogeneity
    )
    profile = profiles[index]
    images, labels = generate_cases(profile, size=size, seed=seed * 1000 + index)
    return profile, images, labels
