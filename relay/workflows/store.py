"""The aggregator's durable job state: a restarted aggregator goes on in the round it was in.

One folder per job under the spool's ``jobs/``:

- ``state.json``: the spec, status, round, this round's contributors, the closed rounds, and
  which files and how much of the log go with it; rewritten (atomically) at every save.
- ``log.jsonl``: what grows by every message (lineage records, ids of the messages applied)
  and notes (late, refused), one line per save with what that save added. Rewritten at every
  save, they would cost each message time in proportion to the job's age times its sites.
- One safetensors file per model it holds: the global model, FedAvgM's velocity, the round's
  running sum, the final model, and one per member (robust aggregation's round updates, an
  ensemble's members). Members are written once each, when they arrive, and from then on
  read back from their file a stretch at a time (:class:`ModelFile`), never all held in
  memory: the aggregator's memory does not grow with the number of sites.

A model file is never overwritten: each save writes changed models under a new generation's
name, appends to the log, then replaces ``state.json`` (which names the files it goes with and
the log's length) atomically, and only then deletes the files it no longer names. A crash
anywhere leaves a ``state.json`` whose files are all there and all its own, and a log whose
first ``log_size`` bytes are; the journal's unfinished message is then applied again from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from relay.aggregation import WeightedMean
from relay.codec import StateDict
from relay.errors import ConfigError
from relay.jobspec import JobSpec
from relay.storage import fsync_directory, replace_file
from relay.workflows.state import GateRefusal, JobState, RoundRecord, Status

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOG_FILE = "log.jsonl"

PARTS = ("reference", "velocity", "mean", "final")
"""The models a job's state may hold, one file each (members have one file each)."""

MEMBER = "members/"
"""Prefix of a member's key in ``JobState.files``: ``members/<site>``."""

LOGGED = ("lineage", "applied", "late", "refused")
"""The job's records that only grow: appended to the log, not rewritten at every save."""

# safetensors' dtype names (its format specification).
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
_NAMED = {name: dtype for dtype, name in _DTYPES.items()}


class JobStore:
    """Jobs' state under ``spool/jobs``."""

    def __init__(self, spool: Path) -> None:
        self.directory = spool / "jobs"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.submissions = spool / "submitted"
        """Job specs taken from ``fedrelay job submit`` whose initial model has not come yet:
        acked, so kept on disk (a restart in between must not lose the spec)."""
        self.submissions.mkdir(exist_ok=True)

    def hold_submission(self, spec: JobSpec) -> None:
        """Keep a submitted spec, durably, until its initial model starts the job."""
        replace_file(self.submissions / f"{spec.job_id}.json", spec.model_dump_json().encode())

    def held_submissions(self) -> dict[str, JobSpec]:
        """The specs kept by :meth:`hold_submission` and not yet dropped, by job id."""
        held = {}
        for path in sorted(self.submissions.glob("*.json")):
            try:
                spec = JobSpec.model_validate_json(path.read_bytes())
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"aggregator state {path}: {e}; it was written by another fedrelay version "
                    "or damaged: delete it and submit that job again"
                ) from e
            held[spec.job_id] = spec
        return held

    def drop_submission(self, job_id: str) -> None:
        """Forget a submitted spec: its job started (and was saved) or was refused."""
        (self.submissions / f"{job_id}.json").unlink(missing_ok=True)

    def save(self, job: JobState) -> None:
        """Write what changed since the last save: new models (``job.dirty``, and members
        still in memory) as new files, new records onto the log, then the state naming them;
        then delete the files it no longer names."""
        folder = self.directory / job.spec.job_id
        folder.mkdir(exist_ok=True)
        order = list(job.reference)
        job.generation += 1
        done = job.status is Status.DONE
        if done:  # nothing to resume: keep the record, not the models
            job.files = {}
        for part in PARTS:
            if part in job.dirty and not done:
                tensors = _tensors(job, part)
                if tensors:
                    name = f"{part}.{job.generation}.safetensors"
                    write_model(folder / name, tensors)
                    job.files[part] = name
                else:
                    job.files.pop(part, None)
        job.files.pop("members", None)  # an earlier version's one file of all members
        for key in [k for k in job.files if k.startswith(MEMBER)]:
            if key.removeprefix(MEMBER) not in job.members:
                del job.files[key]  # a round or job the member belonged to is over
        if not done:
            for site, member in job.members.items():
                if isinstance(member, ModelFile):
                    continue
                name = f"member.{site}.{job.generation}.safetensors"
                write_model(folder / name, member)
                job.files[MEMBER + site] = name
                # From now on read from disk when needed: K members are not held in memory.
                job.members[site] = ModelFile(folder / name)
        _append_log(folder / LOG_FILE, job)
        replace_file(folder / STATE_FILE, json.dumps(_record(job, order)).encode())
        job.dirty.clear()
        for path in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.tmp")]:
            if path.name not in job.files.values():
                path.unlink()  # replaced, or left by a save a crash cut short

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


class ModelFile(Mapping[str, torch.Tensor]):
    """A model in a safetensors file, read from it when used: whole tensors by name, or
    stretches of one (:class:`relay.aggregation.StoredModel`). Nothing stays in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._base = 8 + size
        self._tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _NAMED.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
            self._tensors[name] = (dtype, tuple(entry["shape"]), entry["data_offsets"][0])

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each tensor's dtype and shape, in the file's order."""
        return {name: (dtype, shape) for name, (dtype, shape, _) in self._tensors.items()}

    def elements(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``name``, flattened, read from the file."""
        dtype, _, offset = self._tensors[name]
        out = torch.empty(max(0, stop - start), dtype=dtype)
        if out.numel():
            with self.path.open("rb") as f:
                f.seek(self._base + offset + start * out.element_size())
                view = out.view(torch.uint8).numpy().data
                if f.readinto(view) != len(view):
                    raise OSError(f"{self.path}: tensor {name!r} is cut short")
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        _, shape, _ = self._tensors[name]
        return self.elements(name, 0, math.prod(shape)).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def write_model(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` as a safetensors file, durably and atomically, straight from their
    memory: no copy of the model is made (a float64 running sum is twice the model)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors.items():
        dtype = _DTYPES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be saved")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    temp = path.with_name(path.name + ".tmp")
    with temp.open("wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for tensor in tensors.values():
            if tensor.numel():
                data = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
                data = data.reshape(-1).view(torch.uint8)
                f.write(data.numpy().data)
        f.flush()
        os.fsync(f.fileno())
    temp.replace(path)
    fsync_directory(path.parent)


def _tensors(job: JobState, part: str) -> StateDict:
    if part == "reference":
        return job.reference
    if part == "velocity":
        return job.velocity
    if part == "mean":
        return job.mean.saved()[0]
    return {f"{i}/{k}": v for i, state in enumerate(job.final) for k, v in state.items()}


def _append_log(path: Path, job: JobState) -> None:
    """Append what the grown records gained since the last save; ``job.log_size`` becomes
    the log's length with it (``state.json``, written next, commits it)."""
    lengths = _lengths(job)
    line: dict[str, list[Any]] = {}
    for key in LOGGED:
        start = job.logged.get(key, 0)
        if lengths[key] == start:
            continue
        if key == "applied":
            line[key] = list(job.applied)[start:]
        elif key == "refused":
            line[key] = [r.model_dump() for r in job.refused[start:]]
        else:
            line[key] = list(getattr(job, key)[start:])
    if not line:
        return
    data = (json.dumps(line) + "\n").encode()
    new = not path.exists()
    with path.open("ab") as f:
        # Past log_size lies what a save that crashed before its state.json appended.
        f.truncate(job.log_size)
        f.write(data)
        f.flush()
        os.fdatasync(f.fileno())
    if new:
        fsync_directory(path.parent)
    job.log_size += len(data)
    job.logged = lengths


def _lengths(job: JobState) -> dict[str, int]:
    return {key: len(getattr(job, key)) for key in LOGGED}


def _read_log(path: Path, size: int) -> dict[str, list[Any]]:
    grown: dict[str, list[Any]] = {key: [] for key in LOGGED}
    if size == 0:
        return grown
    with path.open("rb") as f:
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{path} holds {len(data)} bytes, its state names {size}")
    for line in data.splitlines():
        for key, items in json.loads(line).items():
            grown[key].extend(items)
    return grown


def _read(folder: Path, files: dict[str, str], part: str, order: list[str]) -> StateDict:
    if part not in files:
        return {}
    tensors = dict(ModelFile(folder / files[part]))

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
        "generation": job.generation,
        "files": job.files,
        "log_size": job.log_size,
        "round_inputs": job.round_inputs,
    }


def _job(folder: Path, record: dict[str, Any]) -> JobState:
    order = list(record["order"])
    files = dict(record["files"])
    grown = _read_log(folder / LOG_FILE, record.get("log_size", 0))
    logged = {key: len(items) for key, items in grown.items()}
    for key in LOGGED:  # an earlier version kept them in state.json: logged at the next save
        grown[key] = record.get(key, []) + grown[key]
    means = _read(folder, files, "mean", order)
    members: dict[str, Mapping[str, torch.Tensor]] = {
        key.removeprefix(MEMBER): ModelFile(folder / name)
        for key, name in files.items()
        if key.startswith(MEMBER)
    }
    members |= _split(_read(folder, files, "members", order))  # an earlier version's
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
        late=grown["late"],
        refused=[GateRefusal.model_validate(r) for r in grown["refused"]],
        applied=dict.fromkeys(grown["applied"]),
        lineage=grown["lineage"],
        round_inputs=record["round_inputs"],
        generation=record["generation"],
        files=files,
        log_size=record.get("log_size", 0),
        logged=logged,
    )
    if not job.reference and job.status is not Status.DONE:
        raise ValueError("the global model's file is missing")
    return job
