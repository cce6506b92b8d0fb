"""Chunking: reassembly in any order; loss, duplication, mix-ups and corruption detected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.chunking import Reassembler, chunk_checksum, split, transfer_key
from relay.codec import digest
from relay.envelope import ModelEnvelope
from relay.errors import ChunkError

CHUNK = 1000


def chunked(
    payload: bytes, chunk_size: int = CHUNK, job_id: str = "job"
) -> list[tuple[ModelEnvelope, memoryview]]:
    parts = split(payload, chunk_size)
    first = None
    out = []
    for i, part in enumerate(parts):
        envelope = ModelEnvelope(
            job_id=job_id,
            algorithm="cwt",
            sender="site-1",
            recipient="site-2",
            payload_digest=digest(payload) if i == len(parts) - 1 else None,
            payload_size=len(payload),
            chunk_index=i,
            chunk_count=len(parts),
            chunk_size=chunk_size,
            chunk_digest=chunk_checksum(part),
            **({"message_id": first} if first else {}),
        )
        first = envelope.message_id
        out.append((envelope, part))
    return out


def add_all(
    reassembler: Reassembler, chunks: list[tuple[ModelEnvelope, memoryview]]
) -> Path | None:
    """Store ``chunks`` in order; what the last one returned."""
    complete = None
    for chunk in chunks:
        complete = reassembler.add(*chunk)
    return complete


@pytest.fixture
def payload() -> bytes:
    return os.urandom(4 * CHUNK + 123)


def test_split_cuts_views_without_copying(payload: bytes) -> None:
    parts = split(payload, CHUNK)
    assert [len(p) for p in parts] == [CHUNK] * 4 + [123]
    assert b"".join(parts) == payload
    assert split(b"small", CHUNK)[0].tobytes() == b"small"


def test_chunks_in_any_order_reassemble_to_the_verified_payload(
    tmp_path: Path, payload: bytes
) -> None:
    chunks = chunked(payload)
    reassembler = Reassembler(tmp_path)
    order = [3, 0, 4, 2, 1]
    results = [reassembler.add(*chunks[i]) for i in order]
    assert results[:-1] == [None] * 4
    complete = results[-1]
    assert complete is not None and complete.read_bytes() == payload
    assert reassembler.pending() == {}


def test_missing_chunks_are_reported_by_index(tmp_path: Path, payload: bytes) -> None:
    chunks = chunked(payload)
    reassembler = Reassembler(tmp_path)
    for i in (0, 2, 4):
        assert reassembler.add(*chunks[i]) is None
    message_id = transfer_key(chunks[0][0])
    assert reassembler.pending() == {message_id: [1, 3]}


def test_exact_duplicate_chunk_is_a_no_op(tmp_path: Path, payload: bytes) -> None:
    chunks = chunked(payload)
    reassembler = Reassembler(tmp_path)
    assert reassembler.add(*chunks[0]) is None
    assert reassembler.add(*chunks[0]) is None
    assert reassembler.missing(transfer_key(chunks[0][0])) == [1, 2, 3, 4]


def test_different_chunk_under_a_used_index_is_refused(tmp_path: Path, payload: bytes) -> None:
    chunks = chunked(payload)
    reassembler = Reassembler(tmp_path)
    reassembler.add(*chunks[0])
    envelope, _ = chunks[0]
    other = bytes(CHUNK)
    forged = envelope.model_copy(update={"chunk_digest": chunk_checksum(other)})
    with pytest.raises(ChunkError, match="different chunk with this index"):
        reassembler.add(forged, memoryview(other))


def test_corrupted_chunk_is_refused(tmp_path: Path, payload: bytes) -> None:
    envelope, part = chunked(payload)[1]
    damaged = bytearray(part)
    damaged[10] ^= 0xFF
    with pytest.raises(ChunkError, match=r"chunk 2/5 .* corrupt"):
        Reassembler(tmp_path).add(envelope, memoryview(damaged))


def test_chunk_of_wrong_length_is_refused(tmp_path: Path, payload: bytes) -> None:
    envelope, part = chunked(payload)[0]
    with pytest.raises(ChunkError, match="holds 999 bytes, expected 1000"):
        Reassembler(tmp_path).add(envelope, part[:-1])


def test_consistently_forged_chunk_is_caught_by_the_whole_payload_digest(
    tmp_path: Path, payload: bytes
) -> None:
    chunks = chunked(payload)
    reassembler = Reassembler(tmp_path)
    for chunk in chunks[:-1]:
        reassembler.add(*chunk)
    envelope, part = chunks[-1]
    swapped = bytes(len(part))  # same length, its own matching chunk digest
    forged = envelope.model_copy(update={"chunk_digest": chunk_checksum(swapped)})
    with pytest.raises(ChunkError, match="reassembled payload"):
        reassembler.add(forged, memoryview(swapped))
    assert reassembler.pending() == {}
    assert not list(tmp_path.iterdir()), "a failed transfer leaves nothing behind"


def test_chunks_of_two_payloads_under_one_id_are_refused(tmp_path: Path, payload: bytes) -> None:
    chunks = chunked(payload)
    reassembler = Reassembler(tmp_path)
    reassembler.add(*chunks[0])
    envelope, part = chunks[1]
    other = envelope.model_copy(update={"payload_size": envelope.payload_size + 1})
    with pytest.raises(ChunkError, match="two payloads share one message id"):
        reassembler.add(other, part)
    reassembler = Reassembler(tmp_path / "again")
    envelope, part = chunks[-1]
    reassembler.add(envelope, part)
    other = envelope.model_copy(update={"payload_digest": "0" * 64})
    with pytest.raises(ChunkError, match="two payloads share one message id"):
        reassembler.add(other, part)


def test_a_restarted_receiver_keeps_the_chunks_it_had(tmp_path: Path, payload: bytes) -> None:
    chunks = chunked(payload)
    first = Reassembler(tmp_path)
    for chunk in chunks[:3]:
        first.add(*chunk)
    second = Reassembler(tmp_path)
    assert second.missing(transfer_key(chunks[0][0])) == [3, 4]
    second.add(*chunks[3])
    complete = second.add(*chunks[4])
    assert complete is not None and complete.read_bytes() == payload


def test_a_finished_jobs_unfinished_transfers_are_deleted_and_other_jobs_kept(
    tmp_path: Path, payload: bytes
) -> None:
    # A sender killed mid-message sends it again whole under a new id: the first copy's
    # chunks never complete. Once the job is over here, they go.
    abandoned, other = chunked(payload), chunked(payload, job_id="other")
    reassembler = Reassembler(tmp_path)
    for chunk in abandoned[:3] + other[:2]:
        reassembler.add(*chunk)
    assert reassembler.discard_job("job") == 1
    assert not any(tmp_path.glob(f"{transfer_key(abandoned[0][0])}.*"))
    restarted = Reassembler(tmp_path)
    assert list(restarted.pending()) == [transfer_key(other[0][0])]
    assert restarted.discard_job("job") == 0


def test_a_transfer_completed_just_before_a_crash_completes_again_on_redelivery(
    tmp_path: Path, payload: bytes
) -> None:
    chunks = chunked(payload)
    first = Reassembler(tmp_path)
    for chunk in chunks:
        complete = first.add(*chunk)
    assert complete is not None  # ... and the process dies before the payload is journalled
    restarted = Reassembler(tmp_path)
    again = restarted.add(*chunks[-1])  # the broker redelivers the last, unacked, chunk
    assert again is not None and again.read_bytes() == payload
    restarted.release(transfer_key(chunks[0][0]))
    assert not list(tmp_path.iterdir())


def test_a_manifest_torn_while_its_first_chunk_was_stored_starts_afresh(
    tmp_path: Path, payload: bytes
) -> None:
    chunks = chunked(payload)
    key = transfer_key(chunks[0][0])
    Reassembler(tmp_path).add(*chunks[0])
    manifest = tmp_path / f"{key}.chunks"
    manifest.write_text(manifest.read_text()[:20])  # the crash came mid-write, before the ack
    restarted = Reassembler(tmp_path)
    assert restarted.missing(key) == []  # no transfer: the first chunk comes again
    complete = add_all(restarted, chunks)  # redelivered from the first, unacked, chunk on
    assert complete is not None and complete.read_bytes() == payload


def test_a_crash_between_the_last_record_and_the_finish_completes_on_redelivery(
    tmp_path: Path, payload: bytes
) -> None:
    chunks = chunked(payload)
    key = transfer_key(chunks[0][0])
    add_all(Reassembler(tmp_path), chunks)
    # As if the process died right after recording the last chunk, before the rename.
    (tmp_path / f"{key}.payload").replace(tmp_path / f"{key}.part")
    restarted = Reassembler(tmp_path)
    again = restarted.add(*chunks[-1])  # the unacked last chunk comes again
    assert again is not None and again.read_bytes() == payload


def test_a_torn_record_is_cut_off_so_the_next_one_is_not_lost(
    tmp_path: Path, payload: bytes
) -> None:
    chunks = chunked(payload)
    key = transfer_key(chunks[0][0])
    add_all(Reassembler(tmp_path), chunks[:2])
    manifest = tmp_path / f"{key}.chunks"
    manifest.write_text(manifest.read_text()[:-10])  # chunk 2's record torn: never acked
    second = Reassembler(tmp_path)
    assert second.missing(key) == [1, 2, 3, 4]
    second.add(*chunks[1])  # redelivered
    third = Reassembler(tmp_path)  # its record must not be glued to the torn one
    assert third.missing(key) == [2, 3, 4]
    complete = add_all(third, chunks[2:])
    assert complete is not None and complete.read_bytes() == payload


def test_an_unreadable_manifest_is_kept_aside_not_deleted(tmp_path: Path, payload: bytes) -> None:
    chunks = chunked(payload)
    key = transfer_key(chunks[0][0])
    Reassembler(tmp_path).add(*chunks[0])
    (tmp_path / f"{key}.chunks").write_text('{"another": "layout"}\n0 abc\n')
    assert Reassembler(tmp_path).pending() == {}
    assert (tmp_path / f"{key}.unreadable").exists()
    assert (tmp_path / f"{key}.part").exists()


def test_chunks_that_disagree_on_their_message_are_refused(tmp_path: Path, payload: bytes) -> None:
    chunks = chunked(payload)
    reassembler = Reassembler(tmp_path)
    reassembler.add(*chunks[0])
    envelope, part = chunks[1]
    with pytest.raises(ChunkError, match="two payloads share one message id"):
        reassembler.add(envelope.model_copy(update={"hop": 7}), part)
