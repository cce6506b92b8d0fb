"""The aggregator's durable job state: a restarted aggregator goes on in the round it was in.

One folder per job under the spool's ``jobs/``: ``state.json`` (the spec, status, round,
contributors, records, and the ids of the messages already applied) and one safetensors file
per model it holds (the global model, FedAvgM's velocity, the round's running sum, robust
aggregation's or an ensemble's members, the final model). A model file is never overwritten:
each save writes changed models under a new generation's name, then ``state.json`` (which
names the files it goes with) atomically, and only then deletes the files it no longer names.
A crash anywhere leaves a ``state.json`` whose files are all there and all its own; the
journal's unfinished message is then applied again from it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load, save

from relay.aggregation import WeightedMean
from relay.codec import StateDict
from relay.errors import ConfigError
from relay.jobspec import JobSpec
from relay.storage import replace_file
from relay.workflows.state import GateRefusal, JobState, RoundRecord, Status

log = logging.getLogger(__name__)

STATE_FILE = "state.json"

PARTS = ("reference", "velocity", "mean", "members", "final")
"""The models a job's state may hold, one file each."""


class JobStore:
    """Jobs' state under ``spool/jobs``."""

    def __init__(self, spool: Path) -> None:
        self.directory = spool / "jobs"
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, job: JobState) -> None:
        """Write the models that changed since the last save (``job.dirty``) as new files,
        then the state naming them, then delete the files it no longer names."""
        folder = self.directory / job.spec.job_id
        folder.mkdir(exist_ok=True)
        order = list(job.reference)
        job.generation += 1
        if job.status is Status.DONE:  # nothing to resume: keep the record, not the models
            job.files = {}
        for part in PARTS:
            if part in job.dirty and job.status is not Status.DONE:
                name = f"{part}.{job.generation}.safetensors"
                _write(folder / name, _tensors(job, part))
                job.files[part] = name
        replace_file(folder / STATE_FILE, json.dumps(_record(job, order)).encode())
        job.dirty.clear()
        for path in folder.glob("*.safetensors"):
            if path.name not in job.files.values():
                path.unlink()

    def load(self) -> list[JobState]:
        """Every job saved, oldest first."""
        jobs = []
        for path in sorted(self.directory.glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime):
            try:
                jobs.append(_job(path.parent, json.loads(path.read_text())))
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(
                    f"aggregator state {path}: {e}; it was written by another fedrelay version "
                    "or damaged: move that job's folder aside to start without it"
                ) from e
        return jobs


def _tensors(job: JobState, part: str) -> StateDict:
    if part == "reference":
        return job.reference
    if part == "velocity":
        return job.velocity
    if part == "mean":
        return job.mean.saved()[0]
    if part == "members":
        return {f"{site}/{k}": v for site, state in job.members.items() for k, v in state.items()}
    return {f"{i}/{k}": v for i, state in enumerate(job.final) for k, v in state.items()}


def _write(path: Path, tensors: StateDict) -> None:
    # Decoded tensors may share one buffer, which safetensors refuses: each gets its own.
    replace_file(path, save({k: v.detach().contiguous().clone() for k, v in tensors.items()}))


def _read(folder: Path, files: dict[str, str], part: str, order: list[str]) -> StateDict:
    if part not in files:
        return {}
    tensors = load((folder / files[part]).read_bytes())

    def rank(key: str) -> tuple[str, int]:
        prefix, _, name = key.rpartition("/")
        return prefix, order.index(name) if name in order else len(order)

    # In the model's own order, so that what is sent again encodes to the same bytes.
    return {key: tensors[key] for key in sorted(tensors, key=rank)}


def _split(tensors: StateDict) -> dict[str, StateDict]:
    groups: dict[str, StateDict] = {}
    for key, tensor in tensors.items():
        prefix, _, name = key.partition("/")
        groups.setdefault(prefix, {})[name] = tensor
    return groups


def _record(job: JobState, order: list[str]) -> dict[str, Any]:
    return {
        "spec": job.spec.model_dump(mode="json"),
        "order": order,
        "status": str(job.status),
        "reason": job.reason,
        "round": job.round,
        "resumes": job.resumes,
        "started": job.started,
        "round_started": job.round_started,
        "deadline": job.deadline,
        "mean": job.mean.saved()[1],
        "contributors": job.contributors,
        "clipped": job.clipped,
        "final_sites": job.final_sites,
        "final_metrics": job.final_metrics,
        "final_counts": job.final_counts,
        "rounds": [asdict(r) for r in job.rounds],
        "late": job.late,
        "refused": [r.model_dump() for r in job.refused],
        "applied": sorted(job.applied),
        "generation": job.generation,
        "files": job.files,
        "lineage": job.lineage,
        "round_inputs": job.round_inputs,
    }


def _job(folder: Path, record: dict[str, Any]) -> JobState:
    order = list(record["order"])
    files = dict(record["files"])
    means = _read(folder, files, "mean", order)
    members = _split(_read(folder, files, "members", order))
    finals = _split(_read(folder, files, "final", order))
    job = JobState(
        JobSpec.model_validate(record["spec"]),
        _read(folder, files, "reference", order),
        status=Status(record["status"]),
        reason=record["reason"],
        round=record["round"],
        resumes=record["resumes"],
        started=record["started"],
        round_started=record["round_started"],
        deadline=record["deadline"],
        mean=WeightedMean.restored(means, record["mean"]) if means else WeightedMean(),
        velocity=_read(folder, files, "velocity", order),
        contributors=record["contributors"],
        clipped=record["clipped"],
        members=members,
        final=[finals[str(i)] for i in range(len(finals))],
        final_sites=record["final_sites"],
        final_metrics=record["final_metrics"],
        final_counts=record["final_counts"],
        rounds=[RoundRecord(**r) for r in record["rounds"]],
        late=record["late"],
        refused=[GateRefusal.model_validate(r) for r in record["refused"]],
        applied=set(record["applied"]),
        lineage=record["lineage"],
        round_inputs=record["round_inputs"],
        generation=record["generation"],
        files=files,
    )
    if not job.reference and job.status is not Status.DONE:
        raise ValueError("the global model's file is missing")
    return job
