"""What the aggregator knows about a job: its status, round, running sums, records."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from relay.aggregation import WeightedMean
from relay.codec import StateDict
from relay.jobspec import JobSpec


class Status(StrEnum):
    """Where a job is in its life."""

    RUNNING = "running"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class RoundRecord:
    """One closed FedAvg round (or the ensemble's fan-in)."""

    round: int
    contributors: dict[str, int]
    missing: list[str]
    closed_by: str
    seconds: float
    clipped: dict[str, float] = field(default_factory=dict)
    """Sites whose update was clipped to the job's ``max_update_norm``, with its norm before."""


class GateRefusal(BaseModel):
    """A ring hop refused by the receiving site's validation gate: ``site`` scored the model
    ``sender`` trained lower, by more than the job's ``ring_gate``, than the model ``sender``
    had been sent, and trained that one instead."""

    model_config = ConfigDict(frozen=True)

    site: str
    cycle: int
    hop: int
    sender: str
    dice_mean: float
    reference_dice_mean: float


@dataclass
class JobState:
    """Everything the coordinator knows about one job."""

    spec: JobSpec
    reference: StateDict
    status: Status = Status.RUNNING
    reason: str = ""
    round: int = 0
    started: float = field(default_factory=time.time)
    round_started: float = field(default_factory=time.time)
    deadline: float | None = None
    mean: WeightedMean = field(default_factory=WeightedMean)
    velocity: StateDict = field(default_factory=dict)
    """FedAvgM's running change of the global model (float64), empty for plain FedAvg."""
    contributors: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    """This round's sites whose update was clipped, with its norm before."""
    members: dict[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    """Ensemble members, or (median, trimmed mean) this round's site models: in memory until
    the state is saved, then read from their files (see :mod:`relay.workflows.store`)."""
    final: list[StateDict] = field(default_factory=list)
    final_sites: list[str] = field(default_factory=list)
    final_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    final_counts: dict[str, int] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    refused: list[GateRefusal] = field(default_factory=list)
    """Ring hops a site's validation gate refused."""
    lineage: list[dict[str, Any]] = field(default_factory=list)
    """Signed lineage records (wire form), in the order they were made or arrived."""
    round_inputs: list[str] = field(default_factory=list)
    """This round's updates, by :func:`relay.lineage.model_digest`, for its aggregate step."""
    resumes: int = 0
    """Times the operator resumed it after it failed or was cancelled."""
    applied: dict[str, None] = field(default_factory=dict)
    """Ids of the messages already applied to this state (a restart must not apply twice);
    a dict as an ordered set, so that each save logs only the ids added since the last."""
    generation: int = 0
    """How many times its state was saved; names the model files of each save."""
    files: dict[str, str] = field(default_factory=dict)
    """The saved model files of the state last saved, by part (``members/<site>`` for each
    member)."""
    log_size: int = 0
    """Bytes of the job's log that belong to the state last saved."""
    logged: dict[str, int] = field(default_factory=dict)
    """How many of each growing record (lineage, applied, …) the log holds."""
    dirty: set[str] = field(default_factory=set)
    """What changed since the state was last saved: ``state``, or a model part's name."""

    @property
    def finished(self) -> bool:
        """Done, failed or cancelled."""
        return self.status in (Status.DONE, Status.FAILED, Status.CANCELLED)
