"""The job a user asks for on the command line, turned into a job spec for any federation.

``fedrelay simulate`` and ``fedrelay job submit`` share these options and their defaults.
Light to import (no torch): the command line builds its options from them at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from relay.jobspec import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    AbsentSite,
    Aggregation,
    Algorithm,
    JobSpec,
    ModelSpec,
    PrivacySpec,
    TrainingSpec,
)


class JobOptions(BaseModel):
    """Algorithm, rounds, model recipe and training settings, with the CLI's defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: Algorithm = Algorithm.FEDAVG
    rounds: int | None = Field(default=None, ge=1, description="None: 1 for swt, else 10")
    local_epochs: int = Field(default=2, ge=1)
    seed: int = Field(default=0, ge=0)
    model: Literal["unet", "segresnet"] = "unet"
    width: int = Field(default=8, ge=1, le=64)
    depth: int = Field(default=4, ge=2, le=6)
    batch_size: int = Field(default=2, ge=1)
    learning_rate: float = Field(default=1e-2, gt=0)
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=4096, le=MAX_CHUNK_SIZE)
    min_sites: int | None = Field(default=None, ge=1)
    round_timeout_s: float = Field(default=3600.0, gt=0)
    server_momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    aggregation: Aggregation = Aggregation.MEAN
    trim_fraction: float = Field(default=0.2, ge=0.0, lt=0.5)
    max_update_norm: float | None = Field(default=None, gt=0)
    ring_gate: float | None = Field(default=None, gt=0, le=1)
    absent_site: AbsentSite = AbsentSite.WAIT
    hop_timeout_s: float | None = Field(default=None, gt=0)
    dp_clip_norm: float | None = Field(default=None, gt=0)
    dp_noise_multiplier: float | None = Field(default=None, gt=0)
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    patch_size: int | None = Field(
        default=None, ge=8, le=512, description="None: train on whole, equal-sized volumes"
    )

    @model_validator(mode="after")
    def _no_setting_ignored(self) -> JobOptions:
        if (self.dp_clip_norm is None) != (self.dp_noise_multiplier is None):
            raise ValueError(
                "differential privacy needs both 'dp_clip_norm' and 'dp_noise_multiplier' "
                "(or neither)"
            )
        # Settings changed from their defaults that the job would ignore (the command line
        # passes every default, so "given" cannot be told from "changed").
        fields = type(self).model_fields
        if self.dp_delta != fields["dp_delta"].default and self.dp_clip_norm is None:
            raise ValueError("'dp_delta' is for differential privacy; set 'dp_clip_norm' too")
        trim = self.trim_fraction != fields["trim_fraction"].default
        if trim and self.aggregation is not Aggregation.TRIMMED_MEAN:
            raise ValueError("'trim_fraction' is for aggregation trimmed-mean only")
        return self

    def privacy(self) -> PrivacySpec | None:
        """The job's privacy settings, if differential privacy is asked for."""
        if self.dp_clip_norm is None or self.dp_noise_multiplier is None:
            return None
        return PrivacySpec(
            clip_norm=self.dp_clip_norm,
            noise_multiplier=self.dp_noise_multiplier,
            delta=self.dp_delta,
        )

    def job(self, *, federation: str, sites: Sequence[str], job_id: str | None = None) -> JobSpec:
        """The job spec for ``sites`` (in ring order) of ``federation``."""
        rounds = self.rounds or (1 if self.algorithm is Algorithm.SWT else 10)
        spec = JobSpec(
            federation=federation,
            algorithm=self.algorithm,
            sites=tuple(sites),
            rounds=rounds,
            min_sites=self.min_sites,
            round_timeout_s=self.round_timeout_s,
            chunk_size=self.chunk_size,
            server_momentum=self.server_momentum,
            aggregation=self.aggregation,
            trim_fraction=self.trim_fraction,
            max_update_norm=self.max_update_norm,
            ring_gate=self.ring_gate,
            absent_site=self.absent_site,
            hop_timeout_s=self.hop_timeout_s,
            privacy=self.privacy(),
            seed=self.seed,
            model=ModelSpec(name=self.model, width=self.width, depth=self.depth),
            training=TrainingSpec(
                local_epochs=self.local_epochs,
                batch_size=self.batch_size,
                learning_rate=self.learning_rate,
                patch_size=None if self.patch_size is None else (self.patch_size,) * 3,
            ),
        )
        if job_id is None:
            return spec
        return JobSpec.model_validate(spec.model_dump() | {"job_id": job_id})


CaseSplit = Literal["even", "brats"]
"""How a simulation shares its cases between sites (see :mod:`node.phantom`)."""


class SimulationConfig(JobOptions):
    """What to simulate: the job, and the generated data of its sites."""

    sites: int = Field(default=3, ge=1, le=64)
    volume_size: int = Field(default=32, ge=16, le=128)
    cases_per_site: int = Field(default=10, ge=4, le=500)
    case_split: CaseSplit = Field(
        default="even", description="even (±20%) or brats (BraTS institution proportions)"
    )
    heterogeneity: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="how far sites' scanners and lesion sizes differ: 0 alike, 1 widest",
    )
    baselines: bool = Field(
        default=False, description="also train centralized and local-only, same budget"
    )
    encrypt_payloads: bool = Field(
        default=False, description="encrypt every payload end to end for its recipient"
    )

    def site_names(self) -> tuple[str, ...]:
        """site-1, site-2, …"""
        return tuple(f"site-{i + 1}" for i in range(self.sites))

    @model_validator(mode="after")
    def _valid_job(self) -> SimulationConfig:
        self.job()  # a setting the job spec refuses is refused here, before any work starts
        levels = 2 ** (self.depth - 1)
        if self.volume_size % levels:
            raise ValueError(
                f"'volume_size' {self.volume_size} must be a multiple of {levels} for a "
                f"network of depth {self.depth}"
            )
        return self

    def job(
        self, *, federation: str = "sim", sites: Sequence[str] = (), job_id: str | None = None
    ) -> JobSpec:
        """The job spec this simulation submits (federation ``sim``, sites site-1 …)."""
        return super().job(federation=federation, sites=sites or self.site_names(), job_id=job_id)
