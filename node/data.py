"""A site's own brain-tumour cases, read from the two layouts hospitals have them in.

- The Medical Segmentation Decathlon's Task01_BrainTumour: ``dataset.json`` listing
  ``imagesTr/*.nii.gz`` (one 4-D image per case, channels FLAIR, T1w, T1gd, T2w) and
  ``labelsTr/*.nii.gz`` (0 background, 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour).
- BraTS (2018-2021): one folder per case holding ``<case>_flair``, ``_t1``, ``_t1ce``, ``_t2``
  and ``_seg`` NIfTI files (0 background, 1 necrotic / non-enhancing core, 2 oedema,
  4 enhancing tumour).

Both become :class:`Case` objects with MONAI's loader and transforms: reoriented to RAS,
cropped to the brain, z-normalised within the brain per modality, and labelled with the
nested regions whole tumour ⊇ tumour core ⊇ enhancing tumour that BraTS is scored on. Every
file's shape is checked from its header before anything is read, so a missing modality, a
mismatched shape or an unknown label value is refused with the case's name, never deep
inside MONAI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
)

from node.phantom import MODALITIES, REGIONS
from relay.errors import ConfigError

Layout = Literal["msd", "brats"]

LABELS: dict[Layout, dict[str, tuple[int, ...]]] = {
    "msd": {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)},
    "brats": {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)},
}
"""Which label values make up each nested region, per layout."""

_BRATS_SUFFIXES = (*MODALITIES, "seg")
_NIFTI = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One patient: ``image`` float32 [4, D, H, W] (FLAIR, T1, T1ce, T2), ``label`` float32
    [3, D, H, W] (WT, TC, ET as 0/1), both cropped to the brain; ``spacing`` the voxel size
    in mm (1 for phantoms), which distances such as HD95 are measured in."""

    name: str
    image: torch.Tensor
    label: torch.Tensor
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


def read_cases(layout: Layout, folder: Path, *, limit: int | None = None) -> list[Case]:
    """All cases of ``folder`` in ``layout`` (the first ``limit`` by name, if given)."""
    if layout not in LABELS:
        raise ConfigError(f"data layout {layout!r} is unknown; use one of {list(LABELS)}")
    if not folder.is_dir():
        raise ConfigError(f"data folder {folder} does not exist or is not a folder")
    files = _msd_files(folder) if layout == "msd" else _brats_files(folder)
    if not files:
        raise ConfigError(f"{folder}: no {layout} cases found; {_HINT[layout]}")
    names = sorted(files)[:limit]
    return [_load(name, files[name], layout) for name in names]


_HINT = {
    "msd": "expected dataset.json with a 'training' list, imagesTr/ and labelsTr/",
    "brats": "expected one folder per case holding <case>_flair/_t1/_t1ce/_t2/_seg.nii.gz",
}


def _msd_files(folder: Path) -> dict[str, dict[str, Any]]:
    index = folder / "dataset.json"
    if not index.is_file():
        raise ConfigError(f"{folder}: no dataset.json; {_HINT['msd']}")
    try:
        listing = json.loads(index.read_text())
        training = listing["training"]
        pairs = [(entry["image"], entry["label"]) for entry in training]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{index}: not an MSD dataset.json ({type(e).__name__}: {e})") from e
    modalities = [str(m).lower() for m in dict(listing.get("modality", {})).values()]
    if modalities and len(modalities) != len(MODALITIES):
        raise ConfigError(
            f"{index}: lists modalities {modalities}; a brain-tumour site needs the "
            f"{len(MODALITIES)} of Task01 (FLAIR, T1w, T1gd, T2w)"
        )
    files = {}
    for image, label in pairs:
        name = Path(image).name.removesuffix(".gz").removesuffix(".nii")
        files[name] = {"image": folder / image, "label": folder / label}
    return files


def _case_folders(folder: Path) -> list[Path]:
    """The case folders below ``folder``: its subfolders, or theirs where a subfolder only
    groups cases (BraTS 2018-2019's HGG/ and LGG/); hidden and ``__MACOSX`` folders skipped."""
    cases = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir() or entry.name.startswith((".", "__")):
            continue
        inner = [p for p in entry.iterdir() if not p.name.startswith((".", "__"))]
        if inner and all(p.is_dir() for p in inner):
            cases.extend(_case_folders(entry))
        else:
            cases.append(entry)
    return cases


def _brats_files(folder: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for case in _case_folders(folder):
        found: dict[str, Path] = {}
        for suffix in _BRATS_SUFFIXES:
            for ext in _NIFTI:
                path = case / f"{case.name}_{suffix}{ext}"
                if path.is_file():
                    found[suffix] = path
        missing = [s for s in _BRATS_SUFFIXES if s not in found]
        if missing:
            raise ConfigError(
                f"case {case.name}: no {', '.join(missing)} file (expected e.g. "
                f"{case.name}_{missing[0]}.nii.gz in {case}); every case needs "
                f"{', '.join(_BRATS_SUFFIXES)}"
            )
        if case.name in files:
            raise ConfigError(
                f"case {case.name} is in both {files[case.name]['label'].parent} and {case}; "
                "case names must be unique under the data folder"
            )
        files[case.name] = {"image": [found[m] for m in MODALITIES], "label": found["seg"]}
    return files


def _shape(case: str, path: Path) -> tuple[int, ...]:
    if not path.is_file():
        raise ConfigError(f"case {case}: file {path} does not exist")
    try:
        return tuple(int(n) for n in nib.load(path).shape)  # type: ignore[attr-defined]
    except Exception as e:  # nibabel raises many kinds for a damaged file
        raise ConfigError(f"case {case}: {path} is not a readable NIfTI file ({e})") from e


def _check_shapes(name: str, files: dict[str, Any]) -> None:
    label = _shape(name, files["label"])
    if len(label) != 3:
        raise ConfigError(f"case {name}: label {files['label']} has shape {label}; expected 3-D")
    images = files["image"] if isinstance(files["image"], list) else [files["image"]]
    shapes = [_shape(name, path) for path in images]
    if len(images) == 1:  # MSD: one 4-D image, modalities last
        (shape,) = shapes
        if len(shape) != 4 or shape[3] != len(MODALITIES):
            raise ConfigError(
                f"case {name}: image {images[0]} has shape {shape}; expected "
                f"{(*label, len(MODALITIES))}, the {len(MODALITIES)} modalities "
                f"({', '.join(MODALITIES)}) last; is a modality missing?"
            )
        shapes = [shape[:3]]
    for path, shape in zip(images, shapes, strict=True):
        if shape != label:
            raise ConfigError(
                f"case {name}: image {path.name} has shape {shape} but label "
                f"{files['label'].name} has {label}; modalities and label must share one grid"
            )


_TRANSFORMS = Compose(
    [
        LoadImaged(keys=("image", "label"), image_only=True),
        EnsureChannelFirstd(keys=("image", "label")),
        Orientationd(
            keys=("image", "label"), axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))
        ),
        CropForegroundd(keys=("image", "label"), source_key="image", allow_smaller=True),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]
)


def _load(name: str, files: dict[str, Any], layout: Layout) -> Case:
    _check_shapes(name, files)
    loaded = _TRANSFORMS(dict(files))
    # Plain tensors: MONAI's MetaTensor carries metadata the trainer has no use for.
    image = loaded["image"].as_tensor().float().contiguous()
    values = loaded["label"].as_tensor()[0].round().to(torch.int64)
    x, y, z = (float(side) for side in loaded["image"].pixdim[:3])
    return Case(name, image, regions(values, layout, case=name), (x, y, z))


def regions(values: torch.Tensor, layout: Layout, *, case: str) -> torch.Tensor:
    """Label values [D, H, W] as nested region channels [3, D, H, W] (WT, TC, ET) in 0/1."""
    groups = LABELS[layout]
    allowed = {0, *groups["wt"]}
    present = {int(v) for v in torch.unique(values).tolist()}
    if unknown := sorted(present - allowed):
        raise ConfigError(
            f"case {case}: label values {unknown} are not {layout} labels "
            f"(expected {sorted(allowed)}); is this the right layout?"
        )
    channels = [torch.isin(values, torch.tensor(groups[r])) for r in REGIONS]
    return torch.stack(channels).float().contiguous()


def cases_from(images: torch.Tensor, labels: torch.Tensor, *, prefix: str) -> list[Case]:
    """Batched volumes [N, 4, D, H, W] and labels [N, 3, D, H, W] (a phantom's) as cases."""
    return [
        Case(f"{prefix}-{i:03d}", image, label)
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
