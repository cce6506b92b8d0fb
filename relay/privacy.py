"""Differential privacy on what leaves a site, and the accountant that says what it costs.

Each model a site sends is its received model plus its update (its change of the model)
clipped to L2 norm ``clip_norm``, with Gaussian noise of standard deviation
``noise_multiplier × clip_norm`` added to every coordinate: the Gaussian mechanism at the
site, as in DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018), but with every site adding its own noise, so that nothing leaving a
site, not even to the aggregator, is un-noised.

**What is protected.** Two data sets of a site, however different (two hospitals' worth of
patients), move a clipped update by at most ``2 × clip_norm``; that is the sensitivity the
accountant uses, so ε bounds what anyone downstream can learn about the site's training data
as a whole, and so about any patient in it. Not covered: the site's validation cases (its
published Dice is computed on them), and its number of training cases (sent as FedAvg's
weight), both treated as public.

**The accountant** is Rényi DP (Mironov, "Rényi Differential Privacy", CSF 2017) of the
Gaussian mechanism composed over a site's releases in one job, converted to (ε, δ); the
arithmetic is Opacus's (``opacus.accountants.analysis.rdp``), with every update sent, never
subsampled. ε is per job: a site that joins several jobs on the same data spends each.

**The noise** is drawn from ChaCha20 keyed, for each release, by an HMAC of a secret the site
keeps in its spool (:func:`site_secret`) over the job, round and hop: no one else can
regenerate it, and a site that restarts and sends the same release again sends the same
bytes, not a second, independently noised view of its update.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from relay.aggregation import clip_update
from relay.codec import StateDict
from relay.errors import ConfigError
from relay.jobspec import Algorithm, JobSpec, PrivacySpec

ORDERS = (
    *(1 + x / 1000.0 for x in (1, 2, 5, 10, 20, 50)),
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
)
"""Rényi orders the accountant minimises over: Opacus's defaults, and orders near 1 for the
small noise multipliers whose best order lies below 1.1."""

SENSITIVITY = 2.0
"""In units of ``clip_norm``: how far two of a site's data sets can move what it sends."""

SECRET_FILE = "privacy.key"
_SECRET_BYTES = 32
_MANTISSA = 53


def privatize(
    reference: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    privacy: PrivacySpec,
    *,
    key: bytes,
) -> StateDict:
    """``trained`` as it may leave the site: its update on ``reference`` clipped to
    ``privacy.clip_norm``, plus Gaussian noise of std ``noise_multiplier × clip_norm`` on
    every floating coordinate, drawn from ``key`` (:func:`release_key`). Inputs are not
    modified."""
    clipped = clip_update(reference, trained, privacy.clip_norm)
    std = privacy.noise_multiplier * privacy.clip_norm
    noisy: StateDict = {}
    for name, tensor in clipped.items():
        if not tensor.is_floating_point():
            noisy[name] = tensor
            continue
        tensor_key = hmac.digest(key, name.encode(), hashlib.sha256)
        noise = gaussian(tensor.numel(), tensor_key).reshape(tensor.shape) * std
        noisy[name] = (tensor.to(torch.float64) + noise).to(tensor.dtype)
    return noisy


def gaussian(count: int, key: bytes) -> torch.Tensor:
    """``count`` standard normal float64 draws from the ChaCha20 stream of ``key`` (32 bytes),
    by the Box-Muller transform of 53-bit uniforms."""
    pairs = (count + 1) // 2
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    words = torch.frombuffer(bytearray(stream.update(bytes(16 * pairs))), dtype=torch.int64)
    uniform = ((words >> (64 - _MANTISSA)) & ((1 << _MANTISSA) - 1)).to(torch.float64)
    uniform = (uniform + 1) / 2.0**_MANTISSA  # in (0, 1]: the logarithm stays finite
    radius = (-2 * uniform[:pairs].log()).sqrt()
    angle = 2 * math.pi * uniform[pairs:]
    return torch.cat((radius * angle.cos(), radius * angle.sin()))[:count]


def site_secret(spool: Path) -> bytes:
    """The site's noise secret, made (owner-only, 0600) on first use and kept in its spool."""
    path = spool / SECRET_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) != _SECRET_BYTES:
            raise ConfigError(
                f"{path} holds {len(secret)} bytes, not a {_SECRET_BYTES}-byte noise secret; "
                "move it aside and restart (the node makes a new one)"
            ) from None
        return secret
    secret = secrets.token_bytes(_SECRET_BYTES)
    with os.fdopen(descriptor, "wb") as file:
        file.write(secret)
        file.flush()
        os.fsync(file.fileno())
    return secret


def release_key(secret: bytes, *, job_id: str, round: int, hop: int) -> bytes:
    """The noise key of one release: the same release always gets the same noise."""
    return hmac.digest(secret, f"{job_id}/{round}/{hop}".encode(), hashlib.sha256)


def releases(spec: JobSpec, *, round: int) -> int:
    """How many models a site has released by the end of ``round`` (a FedAvg round or a ring
    cycle): one a round for FedAvg and CWT, one in all for SWT and the ensemble."""
    if spec.algorithm in (Algorithm.FEDAVG, Algorithm.CWT):
        return round + 1
    return 1


def epsilon(releases: int, privacy: PrivacySpec) -> float:
    """The ε of ``releases`` releases at ``privacy.delta``: Gaussian mechanisms of noise
    multiplier ``noise_multiplier / SENSITIVITY`` relative to the sensitivity."""
    if releases < 1:
        raise ValueError(f"releases must be at least 1, got {releases}")
    multiplier = privacy.noise_multiplier / SENSITIVITY
    rdp = compute_rdp(q=1.0, noise_multiplier=multiplier, steps=releases, orders=list(ORDERS))
    with warnings.catch_warnings():
        # At the smallest order for tiny noise: ε is still an upper bound, only looser, and
        # so large that it guarantees nothing anyway.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        spent, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=privacy.delta)
    return float(spent)
