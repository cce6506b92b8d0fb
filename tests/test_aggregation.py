"""Aggregation math: FedAvg's weighted mean, compatibility checks, ensemble bundles."""

from __future__ import annotations

import pytest
import torch

from relay.aggregation import (
    WeightedMean,
    bundle,
    check_compatible,
    clip_update,
    coordinate_median,
    server_step,
    trimmed_mean,
    unbundle,
    update_norm,
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


def test_the_coordinate_median_ignores_a_minority_of_wild_values() -> None:
    states = [state(v) for v in (1.0, 2.0, 3.0, 4.0, -1000.0)]
    median = coordinate_median(states)
    assert torch.equal(median["w"], torch.full((2, 3), 2.0))
    assert median["h"].dtype == torch.float16 and median["steps"] == states[0]["steps"]
    even = coordinate_median([state(1.0), state(2.0), state(10.0), state(500.0)])
    assert torch.equal(even["w"], torch.full((2, 3), 6.0))  # the middle two's mean
    # Integer tensors too: no one site (here the first) decides them.
    counters = coordinate_median([state(1.0, steps=s) for s in (10**9, 4, 5, 6, 7)])
    assert counters["steps"] == 6


def test_the_trimmed_mean_drops_the_extremes_at_each_end() -> None:
    states = [state(v) for v in (1.0, 2.0, 3.0, 4.0, 6e4)]
    assert torch.equal(trimmed_mean(states, 0.2)["w"], torch.full((2, 3), 3.0))  # 2, 3, 4
    assert torch.allclose(
        trimmed_mean(states, 0.0)["w"], weighted_mean([(x, 1) for x in states])["w"]
    )
    with pytest.raises(ValueError, match=r"trim fraction must be in \[0, 0.5\), got 0.5"):
        trimmed_mean(states, 0.5)
    with pytest.raises(ValueError, match="no updates"):
        coordinate_median([])


def test_a_long_update_is_clipped_to_the_norm_and_a_short_one_kept() -> None:
    reference = {"w": torch.zeros(4), "steps": torch.tensor(3)}
    long = {"w": torch.tensor([3.0, 4.0, 0.0, 0.0]), "steps": torch.tensor(5)}
    assert update_norm(reference, long) == pytest.approx(5.0)
    clipped = clip_update(reference, long, 1.0)
    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert clipped["steps"] == 5 and torch.equal(long["w"], torch.tensor([3.0, 4.0, 0.0, 0.0]))
    assert clip_update(reference, long, 10.0)["w"] is long["w"]
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_update(reference, long, 0.0)
