"""A site's own cases: MSD Task01 and BraTS folders read back as nested tumour regions."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from node.data import read_cases
from relay.errors import ConfigError

SHAPE = (20, 18, 16)
BRAIN = (slice(2, 18), slice(3, 15), slice(2, 14))  # nonzero box; the rest is background


def volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.zeros(SHAPE, dtype=np.float32)
    data[BRAIN] = rng.uniform(50, 150, size=data[BRAIN].shape)
    return data


def label_volume(values: tuple[int, int, int]) -> np.ndarray:
    """Oedema-like outer value, core-like middle value, enhancing-like inner value."""
    outer, middle, inner = values
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6:14, 6:12, 5:11] = outer
    label[8:12, 7:11, 6:10] = middle
    label[9:11, 8:10, 7:9] = inner
    return label


def save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)  # type: ignore[attr-defined, no-untyped-call]


def write_msd(root: Path, cases: int = 2, *, labels: tuple[int, int, int] = (1, 2, 3)) -> Path:
    training = []
    for i in range(cases):
        image = np.stack([volume(10 * i + m) for m in range(4)], axis=-1)
        save(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", image)
        save(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", label_volume(labels))
        training.append(
            {
                "image": f"./imagesTr/BRATS_{i:03d}.nii.gz",
                "label": f"./labelsTr/BRATS_{i:03d}.nii.gz",
            }
        )
    listing = {
        "name": "BRATS",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(listing))
    return root


def write_brats(
    root: Path, cases: int = 2, *, labels: tuple[int, int, int] = (2, 1, 4), first: int = 0
) -> Path:
    for i in range(first, first + cases):
        name = f"BraTS20_Training_{i:03d}"
        for m, modality in enumerate(("flair", "t1", "t1ce", "t2")):
            save(root / name / f"{name}_{modality}.nii.gz", volume(10 * i + m))
        save(root / name / f"{name}_seg.nii.gz", label_volume(labels))
    return root


@pytest.mark.parametrize("layout", ["msd", "brats"])
def test_both_layouts_read_as_nested_regions_cropped_to_the_brain(
    tmp_path: Path, layout: str
) -> None:
    root = write_msd(tmp_path) if layout == "msd" else write_brats(tmp_path)
    cases = read_cases(layout, root)  # type: ignore[arg-type]
    assert len(cases) == 2
    case = cases[0]
    brain = tuple(s.stop - s.start for s in BRAIN)
    assert case.image.shape == (4, *brain)  # background cropped away
    assert case.label.shape == (3, *brain)
    wt, tc, et = case.label.sum(dim=(1, 2, 3)).tolist()
    assert (wt, tc, et) == (8 * 6 * 6, 4 * 4 * 4, 2 * 2 * 2)
    assert bool((case.label[2] <= case.label[1]).all() and (case.label[1] <= case.label[0]).all())
    # z-normalised within the brain, per modality
    means = case.image.mean(dim=(1, 2, 3))
    assert torch.allclose(means, torch.zeros(4), atol=1e-4)


def test_msd_and_brats_label_codes_give_the_same_regions(tmp_path: Path) -> None:
    msd = read_cases("msd", write_msd(tmp_path / "msd", 1))[0]
    brats = read_cases("brats", write_brats(tmp_path / "brats", 1))[0]
    assert torch.equal(msd.label, brats.label)


def test_a_missing_brats_modality_names_the_case(tmp_path: Path) -> None:
    root = write_brats(tmp_path)
    (root / "BraTS20_Training_001" / "BraTS20_Training_001_t1ce.nii.gz").unlink()
    with pytest.raises(ConfigError, match=r"case BraTS20_Training_001: no t1ce file"):
        read_cases("brats", root)


def test_an_msd_image_without_four_modalities_names_the_case(tmp_path: Path) -> None:
    root = write_msd(tmp_path)
    save(root / "imagesTr" / "BRATS_001.nii.gz", np.stack([volume(0)] * 3, axis=-1))
    with pytest.raises(ConfigError, match=r"case BRATS_001: .* is a modality missing"):
        read_cases("msd", root)


def test_mismatched_shapes_name_the_case_and_files(tmp_path: Path) -> None:
    root = write_brats(tmp_path)
    save(root / "BraTS20_Training_000" / "BraTS20_Training_000_t2.nii.gz", np.ones((20, 18, 15)))
    with pytest.raises(ConfigError, match=r"case BraTS20_Training_000: image .*_t2.nii.gz"):
        read_cases("brats", root)


@pytest.mark.parametrize(
    ("layout", "labels", "bad"), [("msd", (1, 2, 4), 4), ("brats", (2, 1, 3), 3)]
)
def test_unknown_label_values_name_the_case(
    tmp_path: Path, layout: str, labels: tuple[int, int, int], bad: int
) -> None:
    root = (
        write_msd(tmp_path, labels=labels)
        if layout == "msd"
        else write_brats(tmp_path, labels=labels)
    )
    with pytest.raises(
        ConfigError, match=rf"case \S+: label values \[{bad}\] are not {layout} labels"
    ):
        read_cases(layout, root)  # type: ignore[arg-type]


def test_a_folder_without_cases_says_what_layout_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no dataset\.json"):
        read_cases("msd", tmp_path)
    with pytest.raises(ConfigError, match="one folder per case"):
        read_cases("brats", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_cases("brats", tmp_path / "nowhere")


def test_brats_2018_groups_and_stray_folders_are_handled(tmp_path: Path) -> None:
    write_brats(tmp_path / "HGG", 2)
    write_brats(tmp_path / "LGG", 1, first=2)
    (tmp_path / "__MACOSX" / "junk").mkdir(parents=True)
    cases = read_cases("brats", tmp_path)
    assert len(cases) == 3
    assert all(type(c.image) is torch.Tensor and type(c.label) is torch.Tensor for c in cases)
    write_brats(tmp_path / "LGG", 1)  # a second BraTS20_Training_000
    with pytest.raises(ConfigError, match="case BraTS20_Training_000 is in both"):
        read_cases("brats", tmp_path)
