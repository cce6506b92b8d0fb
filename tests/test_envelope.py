"""Envelope and job-spec schemas: each violation gets an error naming field, value, expectation."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from relay.envelope import UpdateEnvelope, parse_envelope, to_wire
from relay.errors import CodecError, EnvelopeError
from relay.frame import decode_frame, encode_frame
from relay.jobspec import parse_job_spec


def update() -> dict[str, Any]:
    return to_wire(
        UpdateEnvelope(
            job_id="job-1",
            algorithm="fedavg",
            sender="site-1",
            recipient="aggregator",
            round=2,
            payload_digest="a" * 64,
            payload_size=10,
            sample_count=12,
        )
    )


def test_valid_envelope_round_trips_through_the_wire_frame() -> None:
    envelope = parse_envelope(update())
    parsed, payload = decode_frame(encode_frame(envelope, b"0123456789"))
    assert parsed == envelope
    assert payload.tobytes() == b"0123456789"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": 1}, "schema_version: got 1; this node reads only version 5"),
        ({"schema_version": None}, "schema_version: got None"),
        ({"kind": "weights"}, "envelope.kind: got 'weights'; expected one of job_spec, model"),
        ({"round": -1}, r"envelope.round: Input should be greater than or equal to 0 \(got -1\)"),
        ({"hop": "x"}, r"envelope.hop: .*valid integer.*\(got 'x'\)"),
        ({"sample_count": 0}, r"envelope.sample_count: .*greater than or equal to 1 \(got 0\)"),
        ({"sender": "Site 1"}, r"envelope.sender: String should match pattern.*\(got 'Site 1'\)"),
        ({"algorithm": "fedprox"}, r"envelope.algorithm: Input should be 'fedavg'.*'fedprox'"),
        ({"payload_digest": "xyz"}, r"envelope.payload_digest: .*pattern.*\(got 'xyz'\)"),
        ({"job_id": None}, r"envelope.job_id: .*\(got None\)"),
        ({"message_id": "not-hex"}, r"envelope.message_id: .*pattern"),
        ({"chunk_index": 1}, "chunk_index 1 must be below chunk_count 1"),
        ({"chunk_count": 3, "chunk_size": 4}, "chunked envelope needs .* chunk_digest"),
        ({"chunk_count": 5, "chunk_size": 4, "chunk_digest": "b" * 32}, "needs 3"),
        ({"surprise": 1}, r"envelope.surprise: Extra inputs are not permitted"),
        ({"metrics": {"dice": "high"}}, r"envelope.metrics.dice: .*valid number"),
    ],
)
def test_each_schema_violation_names_its_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        parse_envelope(update() | change)


def test_missing_field_is_named() -> None:
    data = update()
    del data["job_id"]
    with pytest.raises(EnvelopeError, match=r"envelope\.job_id: missing; it is required"):
        parse_envelope(data)


def test_the_payload_digest_travels_in_the_only_or_last_chunk() -> None:
    data = update()
    del data["payload_digest"]
    with pytest.raises(EnvelopeError, match="payload_digest is missing; the only or last chunk"):
        parse_envelope(data)
    chunked = {"chunk_count": 3, "chunk_size": 4, "payload_size": 10, "chunk_digest": "b" * 32}
    with pytest.raises(EnvelopeError, match="chunk 1/3 carries one; only the last chunk does"):
        parse_envelope(data | chunked | {"payload_digest": "a" * 64})
    assert parse_envelope(data | chunked).payload_digest is None
    assert parse_envelope(data | chunked | {"chunk_index": 2, "payload_digest": "a" * 64})


def test_a_non_map_is_not_an_envelope() -> None:
    with pytest.raises(EnvelopeError, match="expected a map of fields, got list"):
        parse_envelope([1, 2])


def test_frame_that_is_not_msgpack_is_refused() -> None:
    with pytest.raises(CodecError, match="message: expected a msgpack map header first"):
        decode_frame(b"\xc1garbage")


def test_frame_without_payload_is_refused() -> None:
    with pytest.raises(CodecError, match="expected a bin32 body"):
        decode_frame(msgpack.packb(update()))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"algorithm": "swt", "sites": ["a", "b"], "rounds": 3}, "'rounds' must be 1 for swt"),
        ({"algorithm": "cwt", "sites": ["a", "a"]}, r"each site once.*\['a'\]"),
        ({"algorithm": "fedavg", "sites": ["a"], "min_sites": 2}, "'min_sites' = 2 is more than"),
        ({"algorithm": "fedavg", "sites": []}, "job.sites: .*at least 1 item"),
        (
            {"algorithm": "fedavg", "sites": ["a"], "model": {"name": "resnet"}},
            r"job.model.name: Input should be 'unet' or 'segresnet' \(got 'resnet'\)",
        ),
        (
            {"algorithm": "fedavg", "sites": ["a"], "training": {"local_epochs": 0}},
            "job.training.local_epochs",
        ),
        ({"sites": ["a"]}, "job.algorithm: missing"),
        ({"algorithm": "cwt", "sites": ["a", "aggregator"]}, "'aggregator' is reserved"),
        ({"algorithm": "cwt", "sites": ["events"]}, "'events' is reserved"),
        ({"algorithm": "cwt", "sites": ["a"], "chunk_size": 2**30}, "job.chunk_size"),
    ],
)
def test_job_spec_errors_name_the_setting(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        parse_job_spec(spec)


def test_an_envelope_header_is_bounded_before_it_is_decoded() -> None:
    hostile = b"\x81\xa1x\xdd" + (1_000_000).to_bytes(4, "big") + b"\x80" * 1_000_000
    with pytest.raises(CodecError, match="within its limits"):
        decode_frame(hostile + b"\xc6\x00\x00\x00\x00")
