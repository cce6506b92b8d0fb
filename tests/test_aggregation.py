"""Aggregation math: FedAvg's weighted mean, compatibility checks, ensemble bundles."""

from __future__ import annotations

import pytest
import torch

from relay.aggregation import (
    WeightedMean,
    bundle,
    check_compatible,
    server_step,
    unbundle,
    weighted_mean,
)
from relay.errors import InvalidInput


def state(value: float, steps: int = 0) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((2, 3), value),
        "h": torch.full((4,), value, dtype=torch.float16),
        "steps": torch.tensor(steps),
    }


def test_weighted_mean_weights_by_sample_count() -> None:
    mean = weighted_mean([(state(1.0), 1), (state(4.0), 3)])
    assert torch.allclose(mean["w"], torch.full((2, 3), 3.25))
    assert mean["h"].dtype == torch.float16
    assert torch.allclose(mean["h"].float(), torch.full((4,), 3.25))


def test_inputs_are_not_modified() -> None:
    a, b = state(1.0), state(2.0)
    weighted_mean([(a, 2), (b, 5)])
    assert torch.equal(a["w"], torch.full((2, 3), 1.0))
    assert torch.equal(b["w"], torch.full((2, 3), 2.0))


def test_integer_tensors_come_from_the_largest_update() -> None:
    mean = weighted_mean([(state(1.0, steps=5), 2), (state(1.0, steps=9), 7), (state(1.0, 1), 3)])
    assert int(mean["steps"]) == 9


def test_streaming_mean_equals_the_pure_function() -> None:
    updates = [(state(float(i)), i + 1) for i in range(5)]
    running = WeightedMean()
    for s, n in updates:
        running.add(s, n)
    assert torch.allclose(running.result()["w"], weighted_mean(updates)["w"])
    assert running.count_weight == 15


def test_incompatible_update_is_refused_with_the_tensor_named() -> None:
    with pytest.raises(InvalidInput, match=r"tensor 'w' is torch.float32 \(3, 2\)"):
        check_compatible(state(1.0), state(1.0) | {"w": torch.zeros(3, 2)}, who="site-1")
    with pytest.raises(InvalidInput, match=r"missing \['steps'\]"):
        check_compatible(
            state(1.0), {k: v for k, v in state(1.0).items() if k != "steps"}, who="site-1"
        )
    with pytest.raises(InvalidInput, match="NaN"):
        check_compatible(state(1.0), state(float("nan")), who="site-1")


def test_bundle_round_trips_and_malformed_bundles_are_refused() -> None:
    members = unbundle(bundle([state(1.0), state(2.0)]), 2)
    assert torch.equal(members[1]["w"], state(2.0)["w"])
    with pytest.raises(InvalidInput, match="member<i>"):
        unbundle({"w": torch.zeros(1)}, 2)
    with pytest.raises(InvalidInput, match="hold no tensors"):
        unbundle(bundle([state(1.0)]), 2)


def test_server_momentum_compounds_the_average_change_and_zero_is_plain_fedavg() -> None:
    reference = {"w": torch.zeros(3), "steps": torch.tensor(1)}
    average = {"w": torch.ones(3), "steps": torch.tensor(2)}
    first, velocity = server_step(reference, average, {}, momentum=0.9)
    assert torch.equal(first["w"], average["w"]) and first["steps"].item() == 2
    # Round two moves by one more unit: the step is that unit plus 0.9 of the last one.
    second, velocity = server_step(
        first, {"w": first["w"] + 1, "steps": average["steps"]}, velocity, momentum=0.9
    )
    assert torch.allclose(second["w"], torch.full((3,), 1 + 1 + 0.9))
    assert second["w"].dtype == torch.float32 and velocity["w"].dtype == torch.float64
    plain, _ = server_step(
        first, {"w": first["w"] + 1, "steps": average["steps"]}, velocity, momentum=0.0
    )
    assert torch.equal(plain["w"], first["w"] + 1)
    assert torch.equal(reference["w"], torch.zeros(3)), "inputs are not modified"
