"""The networks a site can build: a fixed registry keyed by name, sized by numbers.

A job spec names a network and its size (:class:`relay.jobspec.ModelSpec`); it never carries
code, so a site only ever runs architectures it already has.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from monai.networks.nets import SegResNet, UNet

from relay.errors import ConfigError
from relay.jobspec import ModelSpec

# SegResNet's residual blocks per level, deepest last, as in Myronenko (2018) for the first
# four levels; extra levels repeat the last count.
_SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4, 4, 4)
# SegResNet's default group norm uses 8 groups, which needs a width divisible by 8.
_SEGRESNET_GROUPS = 8


def _unet(spec: ModelSpec) -> torch.nn.Module:
    model: torch.nn.Module = UNet(
        spatial_dims=3,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=tuple(spec.width * 2**level for level in range(spec.depth)),
        strides=(2,) * (spec.depth - 1),
        num_res_units=1,
    )
    return model


def _segresnet(spec: ModelSpec) -> torch.nn.Module:
    # Fewer groups for narrow test-sized widths (4, 6, ...) instead of refusing them.
    groups = math.gcd(spec.width, _SEGRESNET_GROUPS)
    model: torch.nn.Module = SegResNet(
        spatial_dims=3,
        init_filters=spec.width,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        blocks_down=_SEGRESNET_BLOCKS_DOWN[: spec.depth],
        blocks_up=(1,) * (spec.depth - 1),
        norm=("GROUP", {"num_groups": groups}),
    )
    return model


_REGISTRY: dict[str, Callable[[ModelSpec], torch.nn.Module]] = {
    "unet": _unet,
    "segresnet": _segresnet,
}

MODEL_NAMES = tuple(sorted(_REGISTRY))
"""Names :func:`build_model` accepts."""


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A freshly initialised network for ``spec``; raises ConfigError for an unknown name."""
    try:
        factory = _REGISTRY[spec.name]
    except KeyError:
        raise ConfigError(
            f"model name {spec.name!r} is not in the registry; choose one of {list(MODEL_NAMES)}"
        ) from None
    return factory(spec)


def initial_weights(spec: ModelSpec, *, seed: int) -> dict[str, torch.Tensor]:
    """The weights of ``build_model(spec)`` initialised from ``seed``, the same for the same seed.

    The global torch RNG is left as it was, so drawing initial weights does not change what
    the caller's own random draws would have been.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    return {name: value.detach().clone().contiguous() for name, value in model.state_dict().items()}
