"""The model registry and the site trainer, with real (tiny) MONAI training on phantoms."""

from __future__ import annotations

import math

import pytest
import torch

from node.data import Case, cases_from
from node.models import build_model, initial_weights
from node.phantom import SiteProfile, generate_cases
from node.trainer import Dice, SegmentationTrainer, StateDict, _hd95
from relay.errors import ConfigError, InvalidInput
from relay.jobspec import ModelSpec, TrainingSpec

SIZE = 16
SPEC = ModelSpec(name="unet", width=4, depth=3)
TRAINING = TrainingSpec(learning_rate=1e-2, batch_size=2)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return generate_cases(SiteProfile(cases=8), size=SIZE, seed=1)


def make_trainer(
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int = 0,
    training: TrainingSpec = TRAINING,
) -> SegmentationTrainer:
    images, labels = data
    return SegmentationTrainer(
        model=SPEC, training=training, cases=cases_from(images, labels, prefix="c"), seed=seed
    )


def clone(weights: StateDict) -> StateDict:
    return {name: value.clone() for name, value in weights.items()}


def same(a: StateDict, b: StateDict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("name", ["unet", "segresnet"])
def test_registry_builds_each_network_for_brats_shaped_input(name: str) -> None:
    model = build_model(ModelSpec(name=name, width=4, depth=3))  # type: ignore[arg-type]
    with torch.inference_mode():
        out = model(torch.zeros(1, 4, SIZE, SIZE, SIZE))
    assert out.shape == (1, 3, SIZE, SIZE, SIZE)


def test_unknown_model_name_is_a_config_error_naming_the_choices() -> None:
    # The job spec's own validation refuses it first; the registry must refuse it too.
    spec = ModelSpec.model_construct(name="vnet", in_channels=4, out_channels=3, width=4, depth=3)
    with pytest.raises(ConfigError, match=r"'vnet'.*segresnet.*unet"):
        build_model(spec)


def test_initial_weights_depend_only_on_the_seed_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = initial_weights(SPEC, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    assert same(first, initial_weights(SPEC, seed=5))
    assert not same(first, initial_weights(SPEC, seed=6))
    assert all(value.is_contiguous() and not value.requires_grad for value in first.values())


def test_split_is_deterministic_with_at_least_one_case_on_each_side(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    trainer = make_trainer(data)
    assert (trainer.train_count, trainer.validation_count) == (6, 2)
    images, labels = data
    with pytest.raises(ConfigError, match="leave none to train on"):
        SegmentationTrainer(
            model=SPEC,
            training=TRAINING,
            cases=cases_from(images[:1], labels[:1], prefix="c"),
            seed=0,
        )


def test_volume_not_divisible_by_the_depth_is_a_config_error() -> None:
    cases = cases_from(*generate_cases(SiteProfile(cases=4), size=18, seed=0), prefix="c")
    with pytest.raises(ConfigError, match="divisible by 4"):
        SegmentationTrainer(model=SPEC, training=TRAINING, cases=cases, seed=0)


def test_training_improves_dice_over_the_initial_weights(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    trainer = make_trainer(data)
    weights = initial_weights(SPEC, seed=0)
    before = trainer.evaluate([weights])
    result = trainer.train(weights, epochs=10, job_id="job", round=0)
    after = trainer.evaluate([result.weights])
    assert result.sample_count == trainer.train_count == 6
    assert result.loss > 0
    assert after.mean > before.mean + 0.2, (before, after)
    assert after.wt > 0.5, after


def test_train_leaves_its_input_weights_untouched_and_returns_new_tensors(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    weights = initial_weights(SPEC, seed=0)
    original = clone(weights)
    result = make_trainer(data).train(weights, epochs=1, job_id="job", round=0)
    assert same(weights, original)
    assert not same(result.weights, original)
    for name, value in result.weights.items():
        assert value.data_ptr() != weights[name].data_ptr()
        assert value.is_contiguous() and value.device.type == "cpu"
        assert not value.requires_grad


def test_identical_seeds_give_identical_trained_weights(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    weights = initial_weights(SPEC, seed=0)
    first = make_trainer(data, seed=3).train(weights, epochs=2, job_id="a", round=1)
    second = make_trainer(data, seed=3).train(weights, epochs=2, job_id="b", round=1)
    other_round = make_trainer(data, seed=3).train(weights, epochs=2, job_id="c", round=2)
    assert same(first.weights, second.weights)
    assert first.loss == second.loss
    assert not same(first.weights, other_round.weights)


def test_optimizer_state_is_kept_per_job_only_when_asked(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    weights = initial_weights(SPEC, seed=0)
    kept = make_trainer(data)
    fresh_job = kept.train(weights, epochs=1, job_id="a", round=0)
    continued = kept.train(weights, epochs=1, job_id="a", round=0)
    other_job = kept.train(weights, epochs=1, job_id="b", round=0)
    assert not same(fresh_job.weights, continued.weights), "Adam state of job 'a' was dropped"
    assert same(fresh_job.weights, other_job.weights), "job 'b' saw job 'a''s Adam state"
    kept.finalize("a")
    assert same(fresh_job.weights, kept.train(weights, epochs=1, job_id="a", round=0).weights)

    stateless = make_trainer(
        data, training=TrainingSpec(learning_rate=1e-2, batch_size=2, keep_optimizer_state=False)
    )
    once = stateless.train(weights, epochs=1, job_id="a", round=0)
    twice = stateless.train(weights, epochs=1, job_id="a", round=0)
    assert same(once.weights, twice.weights)


def test_ensemble_of_two_members_gives_dice_in_the_unit_interval(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    trainer = make_trainer(data)
    start = initial_weights(SPEC, seed=0)
    a = trainer.train(start, epochs=3, job_id="a", round=0).weights
    b = trainer.train(start, epochs=3, job_id="b", round=1).weights
    a_before, b_before = clone(a), clone(b)
    dice = trainer.evaluate([a, b])
    assert isinstance(dice, Dice)
    for name, value in dice.as_dict().items():
        assert 0.0 <= value <= 1.0 if name.startswith("dice") else value >= 0.0
    assert dice.as_dict()["dice_mean"] == pytest.approx((dice.wt + dice.tc + dice.et) / 3)
    assert same(a, a_before) and same(b, b_before)
    # An ensemble of one model with itself is that model.
    assert trainer.evaluate([a, a]) == trainer.evaluate([a])


def test_absent_region_predicted_absent_scores_one_not_nan(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = data
    no_tumour = torch.zeros_like(labels)
    trainer = SegmentationTrainer(
        model=SPEC, training=TRAINING, cases=cases_from(images, no_tumour, prefix="c"), seed=0
    )
    weights = initial_weights(SPEC, seed=0)
    # A large negative output bias makes the model predict no tumour anywhere.
    last_bias = [name for name in weights if name.endswith("bias")][-1]
    weights[last_bias] = torch.full_like(weights[last_bias], -100.0)
    assert trainer.evaluate([weights]) == Dice(1.0, 1.0, 1.0, hd95_wt=0.0, hd95_tc=0.0, hd95_et=0.0)


def test_weights_of_another_model_are_invalid_input(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    wrong = initial_weights(ModelSpec(name="unet", width=8, depth=3), seed=0)
    with pytest.raises(InvalidInput, match="do not fit"):
        make_trainer(data).train(wrong, epochs=1, job_id="job", round=0)


def test_cases_of_any_size_train_on_patches_and_are_scored_by_sliding_window(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    # Real cases cropped to the brain differ in size, and in no way fit the network's
    # depth: crops of patch_size train it, and a sliding window scores whole cases.
    images, labels = data
    cases = [
        Case(f"c{i}", image[:, : 13 + i, 1:, : 15 - i % 2], label[:, : 13 + i, 1:, : 15 - i % 2])
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
    training = TrainingSpec(learning_rate=1e-2, batch_size=2, patch_size=(8, 8, 8))
    trainer = SegmentationTrainer(model=SPEC, training=training, cases=cases, seed=0)
    weights = initial_weights(SPEC, seed=0)
    before = trainer.evaluate([weights])
    result = trainer.train(weights, epochs=12, job_id="job", round=0)
    again = trainer.train(weights, epochs=12, job_id="other", round=0)
    after = trainer.evaluate([result.weights])
    assert same(result.weights, again.weights), "crops are drawn from (seed, round)"
    assert after.mean > before.mean + 0.2, (before, after)
    assert after.hd95_wt is not None and after.hd95_wt >= 0


def test_whole_volume_training_refuses_cases_of_different_sizes(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = data
    cases = cases_from(images, labels, prefix="c")
    cases[3] = Case("odd", images[3][:, :8], labels[3][:, :8])
    with pytest.raises(ConfigError, match=r"set the job's training\.patch_size"):
        SegmentationTrainer(model=SPEC, training=TRAINING, cases=cases, seed=0)


def test_hd95_is_zero_for_a_perfect_prediction_and_grows_with_the_error(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = data
    case = Case("c", images[0], labels[0], spacing=(2.0, 2.0, 2.0))
    perfect = _hd95(labels[0][None], case)
    shifted = _hd95(labels[0].roll(2, dims=1)[None], case)
    assert perfect == [0.0, 0.0, 0.0]
    assert shifted[0] == pytest.approx(4.0)  # 2 voxels of 2 mm
    # A region missed entirely costs the most a distance can be here: the volume's diagonal.
    missed = labels[0].clone()[None]
    missed[0, 2] = 0
    diagonal = 2.0 * math.sqrt(3 * 16**2)
    assert _hd95(missed, case)[2] == pytest.approx(diagonal)
