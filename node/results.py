"""Writing a finished job's results: the final model as safetensors, and a JSON record."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from relay.aggregation import bundle
from relay.codec import StateDict
from relay.storage import file_digest, replace_file
from relay.workflows.state import JobState, Status

MODEL_FILE = "model.safetensors"
JOB_FILE = "job.json"
LINEAGE_FILE = "lineage.json"
ROSTER_FILE = "roster.json"
"""The roster a simulation writes beside its model (its keys exist only for the run)."""
LINEAGE_KEY = "fedrelay_lineage"
"""The model file's metadata entry that holds its lineage."""


def save_model(state: JobState, output: Path) -> tuple[str, str]:
    """The final model (an ensemble's members prefixed ``member<i>.``) as safetensors, with
    its lineage beside it (``lineage.json``) and inside it.

    Returns the file's name and its sha256. The metadata holds the job spec
    (``fedrelay_job``), the member sites (``members``) and the signed lineage
    (``fedrelay_lineage``, see :mod:`relay.lineage`).
    """
    weights: StateDict = bundle(state.final) if len(state.final) > 1 else state.final[0]
    metadata = {
        "fedrelay_job": state.spec.model_dump_json(),
        "members": json.dumps(state.final_sites),
        LINEAGE_KEY: json.dumps(state.lineage),
    }
    replace_file(output / LINEAGE_FILE, (json.dumps(state.lineage, indent=1) + "\n").encode())
    path = output / MODEL_FILE
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata=metadata)
    return MODEL_FILE, file_digest(path)


def write_job(state: JobState, output: Path) -> Path:
    """``output/<job id>/job.json`` (and the model, if the job is done); returns the folder."""
    folder = output / state.spec.job_id
    folder.mkdir(parents=True, exist_ok=True)
    model_file, model_digest = (
        save_model(state, folder) if state.status is Status.DONE else (None, None)
    )
    record = {
        "status": str(state.status),
        "reason": state.reason,
        "job": state.spec.model_dump(mode="json"),
        "final": state.final_metrics,
        "final_counts": state.final_counts,
        "rounds": [asdict(r) for r in state.rounds],
        "late": state.late,
        "refused_hops": [r.model_dump() for r in state.refused],
        "members": state.final_sites,
        "model_file": model_file,
        "model_sha256": model_digest,
    }
    replace_file(folder / JOB_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return folder
