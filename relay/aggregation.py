"""Aggregation math: pure functions and a streaming accumulator; workflows only coordinate.

FedAvg's weighted mean follows McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data" (AISTATS 2017): the global model is the average of the
site models weighted by their numbers of training samples. Server momentum (FedAvgM) follows
Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification" (2019): the round's average change of the model is a pseudo-gradient that
the server applies with momentum.

Against faulty or hostile sites (any one of which may send scaled, sign-flipped or garbage
weights, and claim any sample count): the coordinate-wise median and trimmed mean of Yin et
al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates" (ICML 2018),
both unweighted so a site cannot buy influence with its sample count; and clipping of each
site's update (its change of the model) to a maximum L2 norm, as in Sun et al., "Can You
Really Backdoor Federated Learning?" (2019), which bounds what any one site can move.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from relay.codec import StateDict
from relay.errors import InvalidInput
from relay.jobspec import trim_count


def check_compatible(
    reference: Mapping[str, torch.Tensor], candidate: StateDict, *, who: str
) -> None:
    """Raise InvalidInput unless ``candidate`` has exactly the reference's names, shapes, dtypes."""
    missing = sorted(set(reference) - set(candidate))
    extra = sorted(set(candidate) - set(reference))
    if missing or extra:
        raise InvalidInput(
            f"{who}: tensors do not match the job's model (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); was it trained from another model recipe?"
        )
    for name, tensor in reference.items():
        other = candidate[name]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise InvalidInput(
                f"{who}: tensor {name!r} is {other.dtype} {tuple(other.shape)}, "
                f"expected {tensor.dtype} {tuple(tensor.shape)}"
            )
        if other.is_floating_point() and not bool(torch.isfinite(other).all()):
            raise InvalidInput(f"{who}: tensor {name!r} holds NaN or infinite values")


class WeightedMean:
    """A running sample-weighted mean of state dicts, holding one sum however many are added.

    Floating tensors are averaged (accumulated in float64 for stability, returned in their
    own dtype). Other tensors (integer counters such as BatchNorm's ``num_batches_tracked``)
    are taken from the update with the largest weight, the first on a tie.
    """

    def __init__(self) -> None:
        self._sums: StateDict = {}
        self._weight = 0
        self._best_weight = 0
        self._dtypes: dict[str, torch.dtype] = {}

    @property
    def count_weight(self) -> int:
        """Total weight added so far."""
        return self._weight

    def add(self, state: Mapping[str, torch.Tensor], weight: int) -> None:
        """Add one update with its sample count; ``state`` is not modified."""
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        take_others = weight > self._best_weight
        for name, tensor in state.items():
            if tensor.is_floating_point():
                scaled = tensor.detach().to(torch.float64) * weight
                if name in self._sums:
                    self._sums[name].add_(scaled)
                else:
                    self._sums[name] = scaled
                    self._dtypes[name] = tensor.dtype
            elif take_others:
                self._sums[name] = tensor.detach().clone()
        self._best_weight = max(self._best_weight, weight)
        self._weight += weight

    def saved(self) -> tuple[StateDict, dict[str, Any]]:
        """Its state, to be written to disk: the sums, and the weights and dtypes."""
        meta = {
            "weight": self._weight,
            "best_weight": self._best_weight,
            "dtypes": {
                name: str(dtype).removeprefix("torch.") for name, dtype in self._dtypes.items()
            },
        }
        return dict(self._sums), meta

    @classmethod
    def restored(cls, sums: StateDict, meta: Mapping[str, Any]) -> WeightedMean:
        """A running mean as :meth:`saved` left it."""
        mean = cls()
        mean._sums = dict(sums)
        mean._weight = int(meta["weight"])
        mean._best_weight = int(meta["best_weight"])
        mean._dtypes = {name: getattr(torch, dtype) for name, dtype in meta["dtypes"].items()}
        return mean

    def result(self) -> StateDict:
        """The weighted mean of everything added."""
        if self._weight == 0:
            raise ValueError("no updates were added")
        return {
            name: (total / self._weight).to(self._dtypes[name]) if name in self._dtypes else total
            for name, total in self._sums.items()
        }


def server_step(
    reference: Mapping[str, torch.Tensor],
    average: Mapping[str, torch.Tensor],
    velocity: Mapping[str, torch.Tensor],
    *,
    momentum: float,
) -> tuple[StateDict, StateDict]:
    """FedAvgM: the next global model and velocity from this round's ``average``.

    ``velocity`` (empty in the first round) becomes ``momentum * velocity + (average -
    reference)`` and the model ``reference + velocity``; with ``momentum`` 0 the model is the
    average itself. Non-floating tensors are taken from ``average``. Inputs are not modified.
    """
    model: StateDict = {}
    moved: StateDict = {}
    for name, mean in average.items():
        if not mean.is_floating_point():
            model[name] = mean
            continue
        step = mean.to(torch.float64) - reference[name].to(torch.float64)
        if name in velocity:
            step = step + momentum * velocity[name]
        moved[name] = step
        model[name] = (reference[name].to(torch.float64) + step).to(mean.dtype)
    return model, moved


def weighted_mean(updates: Sequence[tuple[Mapping[str, torch.Tensor], int]]) -> StateDict:
    """The sample-weighted mean of ``(state dict, sample count)`` pairs (FedAvg)."""
    mean = WeightedMean()
    for state, weight in updates:
        mean.add(state, weight)
    return mean.result()


def bundle(members: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Several models in one state dict (``member<i>.<name>``), for sending an ensemble."""
    return {f"member{i}.{name}": t for i, state in enumerate(members) for name, t in state.items()}


def unbundle(state: Mapping[str, torch.Tensor], members: int) -> list[StateDict]:
    """Split a :func:`bundle` back into ``members`` models; InvalidInput if it is not one."""
    if members == 1:
        return [dict(state)]
    out: list[StateDict] = [{} for _ in range(members)]
    for key, tensor in state.items():
        prefix, _, name = key.partition(".")
        index = prefix.removeprefix("member")
        if not prefix.startswith("member") or not index.isdigit() or int(index) >= members:
            raise InvalidInput(
                f"ensemble payload: tensor {key!r} is not 'member<i>.<name>' with i < {members}"
            )
        out[int(index)][name] = tensor
    if any(not member for member in out):
        raise InvalidInput(f"ensemble payload: some of the {members} members hold no tensors")
    return out


def update_norm(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of ``state - reference`` over all floating tensors (a site's update)."""
    total = torch.zeros((), dtype=torch.float64)
    for name, tensor in state.items():
        if tensor.is_floating_point():
            total += (tensor.to(torch.float64) - reference[name].to(torch.float64)).square().sum()
    return float(total.sqrt())


def clip_update(
    reference: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    max_norm: float,
    *,
    norm: float | None = None,
) -> StateDict:
    """``state`` with its update scaled down to L2 norm ``max_norm`` if it is longer; else the
    same tensors. ``norm``: the update's, if the caller has it already. Inputs are not
    modified."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    if norm is None:
        norm = update_norm(reference, state)
    if norm <= max_norm:
        return dict(state)
    scale = max_norm / norm
    clipped: StateDict = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            clipped[name] = tensor
            continue
        base = reference[name].to(torch.float64)
        clipped[name] = (base + (tensor.to(torch.float64) - base) * scale).to(tensor.dtype)
    return clipped


SLICE_BYTES = 4 * 1024 * 1024
"""How many bytes of one tensor, over all of a round's models together, robust aggregation
sorts at a time: its memory stays bounded however many sites there are (sorting takes some
eight times this: values, int64 indices, torch's working copies), and models kept on disk
(:class:`StoredModel`) are read a stretch at a time, never whole."""


@runtime_checkable
class StoredModel(Protocol):
    """A model kept on disk, read a stretch of one tensor at a time."""

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each tensor's dtype and shape, in the model's order, without reading any."""
        ...

    def elements(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``name``, flattened."""
        ...


Model = Mapping[str, torch.Tensor]


def coordinate_median(states: Sequence[Model]) -> StateDict:
    """The element-wise median of the sites' models (the mean of the middle two for an even
    count; for integer tensors, the lower of the two). Models may be :class:`StoredModel` s."""
    return _coordinate_wise(states, trim=None)


def trimmed_mean(states: Sequence[Model], fraction: float) -> StateDict:
    """The element-wise mean after dropping the ``floor(fraction * n)`` largest and smallest
    values of each element; integer tensors get the element-wise lower median. Models may be
    :class:`StoredModel` s."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    return _coordinate_wise(states, trim=trim_count(fraction, len(states)))


def _layout(state: Model) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if isinstance(state, StoredModel):
        return state.layout()
    return {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()}


def _elements(state: Model, name: str, start: int, stop: int) -> torch.Tensor:
    if isinstance(state, StoredModel):
        return state.elements(name, start, stop)
    return state[name].reshape(-1)[start:stop]


def _coordinate_wise(states: Sequence[Model], *, trim: int | None) -> StateDict:
    if not states:
        raise ValueError("no updates were added")
    n = len(states)
    # The median's middle one or two, or what the trim leaves.
    low, high = ((n - 1) // 2, n // 2 + 1) if trim is None else (trim, n - trim)
    result: StateDict = {}
    for name, (dtype, shape) in _layout(states[0]).items():
        count = math.prod(shape)
        flat = torch.empty(count, dtype=dtype)
        # A stretch at a time (elements are independent): K whole tensors sorted at once
        # would hold K models' worth of a large layer, and its int64 sort indices twice that.
        step = max(1, SLICE_BYTES // (n * flat.element_size()))
        for start in range(0, count, step):
            stop = min(count, start + step)
            rows = [_elements(state, name, start, stop) for state in states]
            # Sorted in the tensors' own dtype (conversion keeps the order); only the kept
            # rows are widened for the mean.
            ordered = torch.stack(rows).sort(dim=0).values
            if flat.is_floating_point():
                flat[start:stop] = ordered[low:high].to(torch.float64).mean(dim=0).to(dtype)
            else:
                # Counters such as BatchNorm's: no one site's value is trusted either.
                flat[start:stop] = ordered[(n - 1) // 2]
        result[name] = flat.reshape(shape)
    return result
