"""Envelope schemas: the validated header of every message fedrelay sends.

An envelope travels in front of its payload (see :mod:`relay.frame`). Each message kind has
its own model; :func:`parse_envelope` picks it by ``kind`` and refuses unknown schema
versions instead of guessing.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from relay.errors import EnvelopeError
from relay.jobspec import (
    MAX_CHUNK_SIZE,
    MAX_PAYLOAD,
    MAX_SITES,
    NAME_PATTERN,
    Algorithm,
    Frozen,
    SiteName,
)
from relay.security import Sealed
from relay.validation import parse

SCHEMA_VERSION: Literal[5] = 5
"""The only envelope schema this build reads and writes."""

AGGREGATOR = "aggregator"
"""The name the aggregator / coordinator uses as sender and recipient."""

EVENTS = "events"
"""Recipient of broadcast events (metrics, job state); routed as ``events.<kind>``."""


MAX_SAMPLES = 10**9
"""More cases than any site holds: a larger sample count is an attempt to dominate FedAvg."""

DIGEST_PATTERN = r"^[0-9a-f]{64}$"

Digest = Annotated[str, Field(pattern=DIGEST_PATTERN, description="sha256, lower-case hex")]
Checksum = Annotated[
    str, Field(pattern=r"^[0-9a-f]{32}$", description="xxh3-128 of one chunk, lower-case hex")
]
Party = Annotated[str, Field(pattern=NAME_PATTERN)]


class Kind(StrEnum):
    """What a message carries."""

    JOB_SPEC = "job_spec"
    MODEL = "model"
    UPDATE = "update"
    ENSEMBLE_MEMBER = "ensemble_member"
    METRICS = "metrics"
    CONTROL = "control"
    EVENT = "event"
    LINEAGE = "lineage"


class Task(StrEnum):
    """What a site is asked to do with a model it receives."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    REFERENCE = "reference"
    """Keep it to judge the ring hop at (round, hop): the model before that hop's training."""


class Command(StrEnum):
    """Control messages."""

    JOB_DONE = "job_done"
    JOB_FAILED = "job_failed"
    CANCEL = "cancel"
    """To a site: forget the job. To the aggregator (from the operator): stop it, failed."""
    RESUME = "resume"
    """To the aggregator (from the operator): run a failed or cancelled job on from the round
    it stopped in."""
    PROBE = "probe"
    """To a site: answer with a ``preflight`` event describing the site (no job needed)."""
    HOP_TAKEN = "hop_taken"
    """To a ring site (from the site it sent the token to): the token is stored there, so the
    sender need not skip that site (absent_site skip or revisit)."""


def new_message_id() -> str:
    """A fresh message id (uuid4 hex)."""
    return uuid.uuid4().hex


class EnvelopeBase(Frozen):
    """Fields every envelope has."""

    kind: Kind
    schema_version: Literal[5] = SCHEMA_VERSION
    message_id: str = Field(default_factory=new_message_id, pattern=r"^[0-9a-f]{32}$")
    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    algorithm: Algorithm
    sender: Party
    recipient: Party
    round: int = Field(default=0, ge=0, description="FedAvg round or ring cycle")
    hop: int = Field(default=0, ge=0, description="position on the ring within a cycle")
    created_at: float = Field(default_factory=time.time, ge=0)
    payload_digest: Digest | None = None
    """The whole payload's sha256, in the only or the last chunk: a sender hashes while its
    earlier chunks are on their way. Earlier chunks carry none."""
    payload_size: int = Field(ge=0, le=MAX_PAYLOAD)
    chunk_index: int = Field(default=0, ge=0)
    chunk_count: int = Field(default=1, ge=1)
    chunk_size: int = Field(
        default=0, ge=0, le=MAX_CHUNK_SIZE, description="bytes per chunk but the last; 0 if one"
    )
    chunk_digest: Checksum | None = None
    """Catches a damaged or mixed-up chunk on arrival; the payload's sha256 is the guarantee."""
    sealed: Sealed | None = None
    """Set when the payload is encrypted for the recipient (see :mod:`relay.security`)."""
    signature: str | None = Field(default=None, pattern=r"^[A-Za-z0-9+/]{86}==$")
    """The sender's Ed25519 signature over every other field, base64."""

    @model_validator(mode="after")
    def _chunks_consistent(self) -> EnvelopeBase:
        if self.chunk_index >= self.chunk_count:
            raise ValueError(
                f"chunk_index {self.chunk_index} must be below chunk_count {self.chunk_count}"
            )
        if self.chunk_count > 1:
            if self.chunk_size <= 0 or self.chunk_digest is None:
                raise ValueError("a chunked envelope needs chunk_size > 0 and a chunk_digest")
            needed = -(-self.payload_size // self.chunk_size)
            if needed != self.chunk_count:
                raise ValueError(
                    f"chunk_count {self.chunk_count} does not fit payload_size "
                    f"{self.payload_size} in chunks of {self.chunk_size} (needs {needed})"
                )
        last = self.chunk_index == self.chunk_count - 1
        if last and self.payload_digest is None:
            raise ValueError(
                "payload_digest is missing; the only or last chunk must carry the payload's sha256"
            )
        if not last and self.payload_digest is not None:
            raise ValueError(
                f"payload_digest: chunk {self.chunk_index + 1}/{self.chunk_count} carries one; "
                "only the last chunk does"
            )
        return self

    @property
    def digest(self) -> str:
        """The payload's sha256, which a complete message always carries."""
        if self.payload_digest is None:
            raise ValueError(f"message {self.message_id}: chunk without the payload digest")
        return self.payload_digest

    @property
    def is_chunked(self) -> bool:
        """True when the payload is split over several messages."""
        return self.chunk_count > 1


class JobSpecEnvelope(EnvelopeBase):
    """Carries a job spec (payload: the spec as JSON)."""

    kind: Literal[Kind.JOB_SPEC] = Kind.JOB_SPEC


class ModelEnvelope(EnvelopeBase):
    """A model sent to a site: the FedAvg global model, or the ring token (payload: tensors)."""

    kind: Literal[Kind.MODEL] = Kind.MODEL
    task: Task = Task.TRAIN
    members: int = Field(
        default=1, ge=1, le=MAX_SITES, description="ensemble members in the payload"
    )
    basis_digest: Digest | None = None
    """Ring tokens under a validation gate: the sha256 of the model (its encoding) the sender
    trained from, so that the site judging the hop knows its reference is that model."""
    revisit: tuple[SiteName, ...] = Field(default=(), max_length=MAX_SITES)
    """Ring tokens under absent_site revisit: the sites skipped earlier in this cycle, still
    to be visited at its end, in order."""


class UpdateEnvelope(EnvelopeBase):
    """A site's locally trained model for a FedAvg round (payload: tensors)."""

    kind: Literal[Kind.UPDATE] = Kind.UPDATE
    sample_count: int = Field(ge=1, le=MAX_SAMPLES, description="training cases behind this update")
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)


class EnsembleMemberEnvelope(EnvelopeBase):
    """A site's own model offered as an ensemble member (payload: tensors)."""

    kind: Literal[Kind.ENSEMBLE_MEMBER] = Kind.ENSEMBLE_MEMBER
    sample_count: int = Field(ge=1, le=MAX_SAMPLES)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)


class MetricsEnvelope(EnvelopeBase):
    """Measurements from a site (payload empty): ``stage`` says which model they describe."""

    kind: Literal[Kind.METRICS] = Kind.METRICS
    stage: Literal["received", "trained", "final", "refused"]
    """Which model: as received, as trained, the final one, or one the ring gate refused
    (its score and the reference's, sent to the aggregator for the results)."""
    sample_count: int = Field(
        default=0, ge=0, le=MAX_SAMPLES, description="validation cases measured"
    )
    metrics: dict[str, float] = Field(max_length=64)


class ControlEnvelope(EnvelopeBase):
    """Job life cycle (payload empty)."""

    kind: Literal[Kind.CONTROL] = Kind.CONTROL
    command: Command
    reason: str = Field(default="", max_length=4096)


EVENT_PATTERN = r"^[a-z][a-z_]{0,31}$"

Detail = str | int | float | bool | None


class EventEnvelope(EnvelopeBase):
    """Something that happened, for whoever watches (payload empty); routed as
    ``events.<event>``: a round opened or closed, a hop, a rejection, an error, a preflight
    answer. ``detail`` holds plain values only. An event about no job has job id ``-``."""

    kind: Literal[Kind.EVENT] = Kind.EVENT
    algorithm: Algorithm | None = None  # type: ignore[assignment]  # not every event has a job
    event: str = Field(pattern=EVENT_PATTERN)
    detail: dict[Annotated[str, Field(max_length=64)], Detail] = Field(
        default_factory=dict, max_length=64
    )

    @model_validator(mode="after")
    def _short_strings(self) -> EventEnvelope:
        long = [k for k, v in self.detail.items() if isinstance(v, str) and len(v) > 4096]
        if long:
            raise ValueError(f"detail: {long} longer than 4096 characters")
        return self


Step = Literal["initial", "train", "aggregate", "final"]
"""A lineage step: the aggregator's initial model, a site's training, an aggregation, the
final model."""


class LineageEnvelope(EnvelopeBase):
    """One step of a model's history, signed by the party that took it (payload empty).

    ``inputs`` are the digests (:func:`relay.lineage.model_digest`) of the models the step
    started from, ``output`` the digest of the model it produced. A site records each model it
    trains and sends on; the aggregator records the initial model and each aggregation."""

    kind: Literal[Kind.LINEAGE] = Kind.LINEAGE
    step: Step
    inputs: list[Digest] = Field(default_factory=list, max_length=MAX_SITES)
    output: Digest
    sample_count: int = Field(default=0, ge=0, le=MAX_SAMPLES, description="training cases")
    validation_count: int = Field(default=0, ge=0, le=MAX_SAMPLES)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)


Envelope = (
    JobSpecEnvelope
    | ModelEnvelope
    | UpdateEnvelope
    | EnsembleMemberEnvelope
    | MetricsEnvelope
    | ControlEnvelope
    | EventEnvelope
    | LineageEnvelope
)
"""Any envelope; validated by :func:`parse_envelope`."""

_BY_KIND: dict[str, type[Envelope]] = {
    Kind.JOB_SPEC: JobSpecEnvelope,
    Kind.MODEL: ModelEnvelope,
    Kind.UPDATE: UpdateEnvelope,
    Kind.ENSEMBLE_MEMBER: EnsembleMemberEnvelope,
    Kind.METRICS: MetricsEnvelope,
    Kind.CONTROL: ControlEnvelope,
    Kind.EVENT: EventEnvelope,
    Kind.LINEAGE: LineageEnvelope,
}


def parse_envelope(data: Any) -> Envelope:
    """Validate a decoded envelope header; raise EnvelopeError naming each bad field.

    The schema version and kind are checked first so that a newer or foreign sender gets one
    clear refusal instead of a list of confusing field errors.
    """
    if not isinstance(data, dict):
        raise EnvelopeError(
            f"envelope: expected a map of fields, got {type(data).__name__}; "
            "the sender is not speaking fedrelay's wire format"
        )
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise EnvelopeError(
            f"envelope.schema_version: got {version!r}; this node reads only version "
            f"{SCHEMA_VERSION}. Upgrade the node or the sender so both speak the same version"
        )
    kind = data.get("kind")
    schema = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise EnvelopeError(
            f"envelope.kind: got {kind!r}; expected one of {', '.join(map(str, Kind))}"
        )
    return parse(schema, data, what="envelope")


def to_wire(envelope: EnvelopeBase) -> dict[str, Any]:
    """The envelope as plain msgpack-able data."""
    return envelope.model_dump(mode="json")
