"""The job spec: everything a federated job fixes up front, shared by every message of the job.

Ring order, rounds or cycles, local epochs, the model recipe and the training settings live
here. Every envelope refers to its job by ``job_id``; a node refuses a message for a job it
has not been given.
"""

from __future__ import annotations

import math
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from relay.validation import parse

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
"""Party and federation names: lower case, digits, ``-``, ``_``; they become routing-key words."""

MAX_SITES = 1000
"""Sites one job may have."""

RESERVED = frozenset({"aggregator", "events"})
"""Names with their own routes; no site may take them."""

MAX_PAYLOAD = 2**32 + 2**26
"""The codec's 4 GiB of tensor bytes plus room for its header."""

MAX_CHUNK_SIZE = 64 * 1024 * 1024
"""Half RabbitMQ 3.x's 128 MiB message limit: room for the envelope, and a clear ceiling."""


def _not_reserved(name: str) -> str:
    if name in RESERVED:
        raise ValueError(f"{name!r} is reserved for fedrelay's own routes; name the site otherwise")
    return name


Name = Annotated[str, Field(pattern=NAME_PATTERN)]
SiteName = Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_not_reserved)]

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
"""8 MiB: under RabbitMQ 4.x's 16 MiB default ``max_message_size``, far under 3.x's 128 MiB."""


class Algorithm(StrEnum):
    """How the model travels."""

    FEDAVG = "fedavg"
    ENSEMBLE = "ensemble"
    SWT = "swt"
    CWT = "cwt"

    @property
    def is_ring(self) -> bool:
        """True for the peer-to-peer ring workflows (SWT, CWT)."""
        return self in (Algorithm.SWT, Algorithm.CWT)


class AbsentSite(StrEnum):
    """What a ring job does when the next site does not take the token (SWT/CWT)."""

    WAIT = "wait"
    """Store and forward: the token waits in the site's durable queue until it returns."""
    SKIP = "skip"
    """After ``hop_timeout_s`` the token moves on to the site after; the skip is recorded."""
    REVISIT = "revisit"
    """Like skip, but the token goes back to the skipped sites at the end of the cycle."""


class Aggregation(StrEnum):
    """How the FedAvg aggregator combines a round's site models (see relay.aggregation)."""

    MEAN = "mean"
    """Weighted by sample count (McMahan et al. 2017); streamed, one running sum."""
    MEDIAN = "median"
    """Coordinate-wise median, unweighted: robust to a minority of hostile sites."""
    TRIMMED_MEAN = "trimmed-mean"
    """Coordinate-wise mean after dropping the ``trim_fraction`` extremes at each end."""


def trim_count(fraction: float, sites: int) -> int:
    """How many values a trimmed mean drops at each end: ``fraction × sites``, rounded down
    (a hair of tolerance keeps 0.3 × 10 from coming out as 2)."""
    return math.floor(fraction * sites + 1e-9)


class Frozen(BaseModel):
    """Base of the spec models: immutable, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(Frozen):
    """Which network from the node's registry, and its size. Never code: only a name and numbers."""

    name: Literal["unet", "segresnet"] = "unet"
    in_channels: int = Field(default=4, ge=1, le=64)
    out_channels: int = Field(default=3, ge=1, le=64)
    width: int = Field(default=8, ge=1, le=256, description="channels of the first level")
    depth: int = Field(default=4, ge=2, le=6, description="resolution levels")


PatchSide = Annotated[int, Field(ge=8, le=512)]


class TrainingSpec(Frozen):
    """Local training at each site."""

    local_epochs: int = Field(default=1, ge=1, le=10_000)
    batch_size: int = Field(default=2, ge=1, le=1024)
    learning_rate: float = Field(default=3e-3, gt=0, le=10)
    keep_optimizer_state: bool = Field(
        default=True,
        description="a site keeps its Adam state between rounds of the same job",
    )
    patch_size: tuple[PatchSide, PatchSide, PatchSide] | None = Field(
        default=None,
        description="train on random crops of this size (half centred on tumour) and "
        "evaluate by sliding window; None trains and evaluates on whole, equal-sized volumes",
    )


class PrivacySpec(Frozen):
    """Differential privacy on every model a site sends (see relay.privacy)."""

    clip_norm: float = Field(gt=0, description="L2 bound on a site's update per model sent")
    noise_multiplier: float = Field(
        gt=0, description="Gaussian noise std, in units of clip_norm; larger: smaller ε"
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, description="the δ ε is reported at")


class JobSpec(Frozen):
    """A federated job. ``rounds``: FedAvg rounds, CWT cycles, or ensemble/SWT training passes."""

    schema_version: Literal[1] = 1
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    federation: Name = "demo"
    algorithm: Algorithm
    sites: tuple[SiteName, ...] = Field(min_length=1, max_length=MAX_SITES)
    rounds: int = Field(default=1, ge=1, le=100_000)
    min_sites: int | None = Field(
        default=None, ge=1, description="FedAvg quorum; None means every site"
    )
    round_timeout_s: float = Field(default=3600.0, gt=0)
    server_momentum: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="FedAvg: momentum the aggregator applies to each round's average change "
        "of the model (FedAvgM); 0 is plain FedAvg",
    )
    aggregation: Aggregation = Field(
        default=Aggregation.MEAN,
        description="FedAvg: mean (by sample count), median or trimmed-mean (robust to "
        "faulty or hostile sites)",
    )
    trim_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=0.5,
        description="trimmed-mean: the fraction of sites' values dropped at each end",
    )
    max_update_norm: float | None = Field(
        default=None,
        gt=0,
        description="FedAvg: clip each site's update (its change of the model) to this L2 "
        "norm before aggregating; None: no clipping",
    )
    ring_gate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="SWT/CWT: a site refuses a model whose mean Dice on its validation cases "
        "is more than this below the model its sender was sent (at first, the job's initial "
        "model), and trains that one instead; None: every hop is taken",
    )
    absent_site: AbsentSite = Field(
        default=AbsentSite.WAIT,
        description="SWT/CWT: when the next site does not take the token within "
        "hop_timeout_s: wait for it, skip it, or skip it and revisit it at the cycle's end",
    )
    hop_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="skip/revisit: seconds the next site has to take the token",
    )
    privacy: PrivacySpec | None = Field(
        default=None, description="differential privacy at every site; None: off"
    )
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=4096, le=MAX_CHUNK_SIZE)
    seed: int = Field(default=0, ge=0)
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if len(set(self.sites)) != len(self.sites):
            dup = sorted({s for s in self.sites if self.sites.count(s) > 1})
            raise ValueError(f"each site once in 'sites'; repeated: {dup}")
        if self.algorithm is Algorithm.SWT and self.rounds != 1:
            raise ValueError(
                "'rounds' must be 1 for swt (one pass round the ring); use cwt for more"
            )
        if self.min_sites is not None and self.min_sites > len(self.sites):
            raise ValueError(
                f"'min_sites' = {self.min_sites} is more than the {len(self.sites)} sites"
            )
        robust = self.aggregation is not Aggregation.MEAN or self.max_update_norm is not None
        if robust and self.algorithm is not Algorithm.FEDAVG:
            raise ValueError(
                f"'aggregation' and 'max_update_norm' apply to fedavg only, not {self.algorithm}"
            )
        if self.ring_gate is not None and not self.algorithm.is_ring:
            raise ValueError(f"'ring_gate' applies to swt and cwt only, not {self.algorithm}")
        self._check_absent_site()
        # A round may close at the quorum: robustness must hold with that few sites.
        quorum = self.min_sites or len(self.sites)
        if self.aggregation is not Aggregation.MEAN and quorum < 3:
            raise ValueError(
                f"{self.aggregation} of {quorum} site(s) (the round's quorum) is no more robust "
                "than the mean; it needs at least 3 sites a round"
            )
        if (
            self.aggregation is Aggregation.TRIMMED_MEAN
            and trim_count(self.trim_fraction, quorum) == 0
        ):
            least = math.ceil(1000 / quorum) / 1000
            raise ValueError(
                f"'trim_fraction' = {self.trim_fraction} of {quorum} sites (the round's quorum) "
                f"trims no site; use at least {least}, or median"
            )
        patch, factor = self.training.patch_size, 2 ** (self.model.depth - 1)
        if patch is not None and any(side % factor for side in patch):
            raise ValueError(
                f"training.patch_size {list(patch)} is not divisible by {factor}, as "
                f"model.depth = {self.model.depth} needs; use multiples of {factor}"
            )
        return self

    def _check_absent_site(self) -> None:
        moving = self.absent_site is not AbsentSite.WAIT
        if moving and not self.algorithm.is_ring:
            raise ValueError(
                f"'absent_site' {self.absent_site} applies to swt and cwt only, not "
                f"{self.algorithm} (fedavg has 'min_sites' and 'round_timeout_s')"
            )
        if moving and self.hop_timeout_s is None:
            raise ValueError(
                f"'absent_site' {self.absent_site} needs 'hop_timeout_s': how many seconds the "
                "next site has to take the token before it is skipped"
            )
        if not moving and self.hop_timeout_s is not None:
            raise ValueError(
                "'hop_timeout_s' is for 'absent_site' skip or revisit; with wait the token "
                "waits for the site however long it takes"
            )
        if moving and self.ring_gate is not None:
            # The gate judges a hop against what its sender was sent, two sites back; a skip
            # changes who that is after the references have gone out.
            raise ValueError(
                f"'ring_gate' and 'absent_site' {self.absent_site} cannot be combined; use "
                "absent_site wait with a gate"
            )

    @property
    def quorum(self) -> int:
        """How many site updates a FedAvg round needs."""
        return self.min_sites if self.min_sites is not None else len(self.sites)


def parse_job_spec(data: object) -> JobSpec:
    """Validate a job spec from plain data; raises EnvelopeError naming every bad field."""
    return parse(JobSpec, data, what="job")
