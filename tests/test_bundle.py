"""Bring your own trainer: a site's own factory, and a MONAI bundle run through the contract."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from node.algo import custom_factory
from node.bundle import BundleAlgo, bundle_trainer
from node.config import FederationConfig
from node.data import cases_from
from node.models import initial_weights
from node.phantom import SiteProfile, generate_cases
from node.process import site_trainers
from node.trainer import SegmentationTrainer
from relay.errors import ConfigError, InvalidInput
from relay.jobspec import Algorithm, JobSpec, ModelSpec, TrainingSpec

MODEL = ModelSpec(name="unet", width=4, depth=3)
JOB = JobSpec(
    algorithm=Algorithm.FEDAVG,
    sites=("site-1",),
    model=MODEL,
    training=TrainingSpec(learning_rate=1e-2, local_epochs=1),
)


def make(job: JobSpec, options: Mapping[str, Any]) -> SegmentationTrainer:
    """A site's own factory, as a hospital would write one."""
    images, labels = generate_cases(SiteProfile(cases=int(options["cases"])), size=16, seed=3)
    return SegmentationTrainer(
        model=job.model, training=job.training, cases=cases_from(images, labels, prefix="x"), seed=0
    )


def write_bundle(root: Path, *, channels: tuple[int, ...] = (4, 8, 16)) -> Path:
    """A tiny MONAI bundle: phantom cases as NIfTI, a UNet, a SupervisedTrainer/Evaluator."""
    images, labels = generate_cases(SiteProfile(cases=6), size=16, seed=4)
    data = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        entry = {}
        for key, volume in (("image", image), ("label", label)):
            path = root / "data" / f"{key}{i}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            array = np.ascontiguousarray(volume.numpy().transpose(1, 2, 3, 0))  # channels last
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)  # type: ignore[attr-defined, no-untyped-call]
            entry[key] = str(path)
        data.append(entry)
    transforms = [
        {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"], "channel_dim": -1},
        {"_target_": "EnsureTyped", "keys": ["image", "label"], "dtype": "$torch.float32"},
    ]
    post = [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
    ]

    def loader(part: list[dict[str, str]], preprocessing: str) -> dict[str, Any]:
        return {
            "_target_": "DataLoader",
            "dataset": {"_target_": "Dataset", "data": part, "transform": f"@{preprocessing}"},
            "batch_size": 2,
            "shuffle": False,
            "num_workers": 0,
        }

    config = {
        "imports": ["$import torch"],
        "bundle_root": str(root),
        "dataset_dir": str(root / "data"),
        "device": "$torch.device('cpu')",
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 4,
            "out_channels": 3,
            "channels": list(channels),
            "strides": [2] * (len(channels) - 1),
            "num_res_units": 1,
        },
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "DiceLoss", "sigmoid": True},
        "optimizer": {
            "_target_": "torch.optim.Adam",
            "params": "$@network.parameters()",
            "lr": 1e-2,
        },
        "train": {
            "preprocessing": {"_target_": "Compose", "transforms": transforms},
            "dataloader": loader(data[:4], "train#preprocessing"),
            "dataset": "@train#dataloader#dataset",
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose", "transforms": post},
            "trainer": {
                "_target_": "SupervisedTrainer",
                "device": "@device",
                "max_epochs": 1,
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "optimizer": "@optimizer",
                "loss_function": "@loss",
                "inferer": "@train#inferer",
                "postprocessing": "@train#postprocessing",
            },
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": transforms},
            "dataloader": loader(data[4:], "validate#preprocessing"),
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose", "transforms": post},
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@validate#dataloader",
                "network": "@network",
                "inferer": "@validate#inferer",
                "postprocessing": "@validate#postprocessing",
                "key_val_metric": {
                    "val_mean_dice": {
                        "_target_": "MeanDice",
                        "include_background": True,
                        "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                    }
                },
            },
        },
    }
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "train.json").write_text(json.dumps(config, indent=1))
    return root


def test_a_monai_bundle_trains_and_evaluates_through_the_site_contract(tmp_path: Path) -> None:
    algo = bundle_trainer(JOB, {"bundle": str(write_bundle(tmp_path / "bundle"))})
    assert isinstance(algo, BundleAlgo)
    assert (algo.train_count, algo.validation_count) == (4, 2)
    start = initial_weights(MODEL, seed=0)
    before = algo.evaluate([start]).as_dict()["val_mean_dice"]
    weights = start
    for round in range(10):
        result = algo.train(weights, epochs=3, job_id="j", round=round)
        weights = result.weights
    after = algo.evaluate([weights]).as_dict()["val_mean_dice"]
    assert result.sample_count == 4 and result.loss > 0
    assert set(weights) == set(start) and not torch.equal(
        weights[next(iter(start))], start[next(iter(start))]
    )
    assert after > before + 0.15, (before, after)  # deterministic: about 0.03 -> 0.23
    with pytest.raises(InvalidInput, match="one model at a time"):
        algo.evaluate([weights, weights])


def test_a_bundle_whose_network_is_not_the_jobs_is_refused(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", channels=(8, 16, 32))
    with pytest.raises(ConfigError, match="its network is not the job's 'unet'"):
        bundle_trainer(JOB, {"bundle": str(bundle)})
    with pytest.raises(ConfigError, match=r"no configs/train\.json"):
        bundle_trainer(JOB, {"bundle": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"\['bundel'\] are not bundle options"):
        bundle_trainer(JOB, {"bundel": str(bundle)})


def site_config(tmp_path: Path, section: str) -> FederationConfig:
    text = f"""
federation = "byo"
[sites.site-1]
password = "pw"
spool = "{tmp_path / "spool"}"
{section}
"""
    return FederationConfig.model_validate(tomllib.loads(text))


def test_a_site_names_its_own_trainer_in_its_configuration(tmp_path: Path) -> None:
    config = site_config(
        tmp_path,
        '[sites.site-1.trainer]\nfactory = "tests.test_bundle:make"\noptions = { cases = 5 }',
    )
    algo = site_trainers(config.site("site-1"), "site-1")(JOB)
    assert isinstance(algo, SegmentationTrainer) and algo.train_count + algo.validation_count == 5


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("tests.no_such_module:make", "cannot import 'tests.no_such_module'"),
        ("tests.test_bundle:nothing", "has no callable 'nothing'"),
    ],
)
def test_a_wrong_trainer_factory_fails_at_start_up(factory: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"sites.site-1.trainer.factory = .*{message}"):
        custom_factory(factory, {}, key="sites.site-1.trainer.factory")


def test_a_site_gives_data_or_a_trainer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"either \[data\] .* or \[trainer\]"):
        site_config(tmp_path, "")


def test_a_failing_or_incomplete_site_trainer_refuses_the_job_not_the_node() -> None:
    broken = custom_factory("tests.test_bundle:broken", {}, key="k")
    with pytest.raises(
        ConfigError, match=r"k = 'tests.test_bundle:broken' failed for job .*KeyError"
    ):
        broken(JOB)
    incomplete = custom_factory("tests.test_bundle:incomplete", {}, key="k")
    with pytest.raises(ConfigError, match=r"returned a object without \['train'"):
        incomplete(JOB)


def broken(job: JobSpec, options: Mapping[str, Any]) -> SegmentationTrainer:
    return options["missing"]  # type: ignore[no-any-return]


def incomplete(job: JobSpec, options: Mapping[str, Any]) -> object:
    return object()


def test_bundle_options_are_checked_when_the_node_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no configs/train\.json"):
        custom_factory("node.bundle:bundle_trainer", {"bundle": str(tmp_path)}, key="k")
