"""Differential privacy on what leaves a site, and the accountant that says what it costs.

DP-FedAvg after McMahan et al., "Learning Differentially Private Recurrent Language Models"
(ICLR 2018), at the level of a whole site: each model a site sends is its received model
plus its update (its change of the model) clipped to L2 norm ``clip_norm`` with Gaussian
noise of standard deviation ``noise_multiplier × clip_norm`` added to every coordinate. One
such release is the Gaussian mechanism with sensitivity ``clip_norm`` over everything the
site's data could change, so the guarantee covers the site's whole data set; a site's
releases over a job compose.

The accountant is Rényi DP (Mironov, "Rényi Differential Privacy", CSF 2017) of the
Gaussian mechanism composed over a site's releases, converted to (ε, δ); the arithmetic is
Opacus's (``opacus.accountants.analysis.rdp``), with every site's update sent, never
subsampled. Metrics a site publishes (Dice on its validation cases) are not privatised.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Mapping

import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from relay.aggregation import clip_update
from relay.codec import StateDict
from relay.jobspec import Algorithm, JobSpec, PrivacySpec

ORDERS = (
    *(1 + x / 1000.0 for x in (1, 2, 5, 10, 20, 50)),
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
)
"""Rényi orders the accountant minimises over: Opacus's defaults, and orders near 1 for the
small noise multipliers whose best order lies below 1.1."""


def privatize(
    reference: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    privacy: PrivacySpec,
    *,
    generator: torch.Generator | None = None,
) -> StateDict:
    """``trained`` as it may leave the site: its update on ``reference`` clipped to
    ``privacy.clip_norm``, plus Gaussian noise of std ``noise_multiplier × clip_norm`` on
    every floating coordinate. Inputs are not modified.

    The noise comes from a generator seeded from the operating system's secure random source
    unless one is given (tests only): noise an observer could regenerate protects nothing.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    clipped = clip_update(reference, trained, privacy.clip_norm)
    std = privacy.noise_multiplier * privacy.clip_norm
    noisy: StateDict = {}
    for name, tensor in clipped.items():
        if not tensor.is_floating_point():
            noisy[name] = tensor
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
        noisy[name] = (tensor.to(torch.float64) + noise).to(tensor.dtype)
    return noisy


def releases(spec: JobSpec, *, round: int) -> int:
    """How many models a site has released by the end of ``round`` (a FedAvg round or a ring
    cycle): one a round for FedAvg and CWT, one in all for SWT and the ensemble."""
    if spec.algorithm in (Algorithm.FEDAVG, Algorithm.CWT):
        return round + 1
    return 1


def epsilon(releases: int, privacy: PrivacySpec) -> float:
    """The ε of ``releases`` Gaussian releases at ``privacy.delta``."""
    if releases < 1:
        raise ValueError(f"releases must be at least 1, got {releases}")
    rdp = compute_rdp(
        q=1.0, noise_multiplier=privacy.noise_multiplier, steps=releases, orders=list(ORDERS)
    )
    with warnings.catch_warnings():
        # At the smallest order for tiny noise: ε is still an upper bound, only looser, and
        # so large that it guarantees nothing anyway.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        spent, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=privacy.delta)
    return float(spent)
