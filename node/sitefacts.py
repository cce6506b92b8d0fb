"""What a site has, as plain values: its cases, its compute device, its spool's disk.

``fedrelay preflight`` reports these facts at the site itself, before its node starts, and
for the whole federation from each running node's answer to a probe. Both take them from
here, so the two agree. The data facts are taken once, from the cases the node has already
read; the disk's afresh on every call (free space changes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch

from node.config import FederationConfig, FolderData, Site
from node.data import LABELS, Case
from node.models import build_model
from node.options import JobOptions
from node.phantom import REGIONS
from relay.envelope import Detail
from relay.jobspec import ModelSpec

Facts = dict[str, Detail]
"""Facts by name; plain values, as an event's detail carries them."""

SPOOL_MODELS = 4
"""Copies of one model a site's spool may hold at once, besides an ensemble's members: the
received model in the journal, its chunks while they are reassembled, the trained model
being sent, and the job's reference model."""

DISK_MARGIN = 256 << 20
"""Room on the spool's filesystem beyond the models: logs, job records, the journal's files."""

MAX_LISTED = 4
"""Distinct spacings or shapes listed before the rest are counted."""


@cache
def default_model_bytes() -> int:
    """Bytes of the model a job gets with the command line's defaults (JobOptions)."""
    options = JobOptions()
    spec = ModelSpec(name=options.model, width=options.width, depth=options.depth)
    state = build_model(spec).state_dict()
    return sum(t.numel() * t.element_size() for t in state.values())


def disk_need(sites: int, model_bytes: int) -> int:
    """Free bytes a site's spool needs for a job whose model has ``model_bytes``: an
    ensemble's final model (one member per site) plus SPOOL_MODELS copies, plus a margin."""
    return (sites + SPOOL_MODELS) * model_bytes + DISK_MARGIN


def _triple(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def _listed(counts: Counter[str]) -> str:
    """The most common values first; a tail past MAX_LISTED is counted, not listed."""
    ranked = [value for value, _ in counts.most_common()]
    shown = ", ".join(ranked[:MAX_LISTED])
    return shown + (f" (+{len(ranked) - MAX_LISTED} more)" if len(ranked) > MAX_LISTED else "")


def label_codes(cases: Sequence[Case], layout: str) -> list[int]:
    """The label values the cases' files hold, read back from their nested regions: a voxel
    in k regions had the layout's value for depth k (e.g. msd 1 oedema, 2 core, 3 enhancing)."""
    groups = LABELS[layout]  # type: ignore[index]  # only folder layouts reach here
    by_depth = {sum(value in groups[r] for r in REGIONS): value for value in groups["wt"]}
    depths: set[int] = set()
    for case in cases:
        depths |= {int(d) for d in torch.unique(case.label.sum(dim=0).round()).tolist()}
    return sorted({0} | {by_depth[d] for d in depths if d in by_depth})


def data_facts(cases: Sequence[Case], *, layout: str) -> Facts:
    """Number of cases, modalities (channels), tumour regions and label values found, voxel
    spacing in mm and volume shapes (after cropping to the brain), of a site's cases."""
    if not cases:
        return {"data": layout, "cases": 0}
    present = {r for case in cases for i, r in enumerate(REGIONS) if bool(case.label[i].any())}
    spacings = Counter(_triple(case.spacing) for case in cases)
    shapes = [tuple(case.image.shape[1:]) for case in cases]
    channels = sorted({int(case.image.shape[0]) for case in cases})
    facts: Facts = {
        "data": layout,
        "cases": len(cases),
        "modalities": channels[0] if len(channels) == 1 else ", ".join(map(str, channels)),
        "regions": ",".join(r for r in REGIONS if r in present),
        "labels": None,
        "spacing_mm": _listed(spacings),
        "shape_min": _triple([min(s[i] for s in shapes) for i in range(3)]),
        "shape_max": _triple([max(s[i] for s in shapes) for i in range(3)]),
    }
    if layout in LABELS:
        facts["labels"] = ",".join(map(str, label_codes(cases, layout)))
    return facts


def device_facts() -> Facts:
    """The device torch would train on here, and its CPU threads."""
    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch_threads": torch.get_num_threads(),
    }


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (a spool not created yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def spool_writable(spool: Path) -> str | None:
    """None if the node can write (and fsync) a file in its spool; else why not. A spool
    that does not exist yet must be creatable: its nearest existing folder is tried."""
    where = _existing(spool)
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".fedrelay-preflight-") as probe:
            probe.write(b"preflight")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        return f"cannot write in {where}: {e.strerror or e}"
    return None


def disk_facts(spool: Path, *, sites: int) -> Facts:
    """Free bytes at the spool's filesystem, what a job with default settings needs there,
    and whether the spool is writable."""
    free = shutil.disk_usage(_existing(spool)).free
    problem = spool_writable(spool)
    return {
        "spool": str(spool),
        "disk_free_bytes": free,
        "disk_need_bytes": disk_need(sites, default_model_bytes()),
        "spool_writable": problem is None,
        "spool_problem": problem,
    }


def site_data_facts(section: Site, cases: Sequence[Case] | None) -> Facts:
    """Data facts of a site: of its cases, or, for a site with its own trainer (which finds
    its data itself), which trainer."""
    if section.trainer is not None:
        return {"data": "trainer", "trainer": section.trainer.factory}
    assert cases is not None  # a site without its own trainer has cases
    layout = section.data.kind if isinstance(section.data, FolderData) else "phantom"
    return data_facts(cases, layout=layout)


def describer(
    config: FederationConfig, name: str, cases: Sequence[Case] | None
) -> Callable[[], Facts]:
    """What site ``name``'s node answers a probe with: its data facts (taken now, once),
    device, and disk (taken at each call)."""
    section = config.site(name)
    fixed: Facts = {"site": name, **site_data_facts(section, cases), **device_facts()}
    sites = len(config.sites)

    def describe() -> Facts:
        return fixed | disk_facts(section.spool, sites=sites)

    return describe
