"""Auditing a final model offline: its signed lineage against the federation's roster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from node.results import LINEAGE_FILE, LINEAGE_KEY, MODEL_FILE, ROSTER_FILE
from relay.errors import ConfigError
from relay.jobspec import JobSpec
from relay.lineage import Verdict, model_digest, verify
from relay.security import Roster, Verifier


def audit(path: Path, roster: Roster | None) -> tuple[Verdict, JobSpec]:
    """Verify the lineage of the model at ``path`` (a model file, or a folder holding one).

    The lineage is the one inside the model file; a ``lineage.json`` beside it must be the
    same. ConfigError when the file is not a fedrelay model or has no lineage.
    """
    model = path / MODEL_FILE if path.is_dir() else path
    try:
        with safe_open(str(model), framework="pt") as f:
            metadata: dict[str, str] = f.metadata() or {}
        state = load_file(str(model))
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{model}: not a readable safetensors model ({e})") from e
    if LINEAGE_KEY not in metadata or "fedrelay_job" not in metadata:
        raise ConfigError(
            f"{model}: no lineage in its metadata; it was not written by a fedrelay aggregator "
            "(or by one older than lineage)"
        )
    records: list[dict[str, Any]] = json.loads(metadata[LINEAGE_KEY])
    spec = JobSpec.model_validate_json(metadata["fedrelay_job"])
    verifier = None
    if roster is not None:
        if roster.federation != spec.federation:
            raise ConfigError(
                f"the roster is federation {roster.federation!r}'s; the model is from "
                f"{spec.federation!r}: give that federation's roster.json"
            )
        verifier = Verifier(roster)
    verdict = verify(records, model=model_digest(state), verifier=verifier, sites=spec.sites)
    beside = model.parent / LINEAGE_FILE
    if beside.exists() and json.loads(beside.read_text()) != records:
        verdict.problems.append(f"{beside} differs from the lineage inside {model.name}")
    return verdict, spec


def find_roster(path: Path) -> Path | None:
    """A simulation's roster beside its model, if there is one."""
    folder = path if path.is_dir() else path.parent
    candidate = folder / ROSTER_FILE
    return candidate if candidate.exists() else None
