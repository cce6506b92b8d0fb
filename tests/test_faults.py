"""Faults injected into a deployed federation (real RabbitMQ, one process per party): the job
completes with the fault-free run's final model, bit for bit, and nothing is lost or counted
twice; or a node stops with a reason that says what to do. One trial of each fault; the
randomized soak (``bench/soak.py``) runs many. The harness is ``tests/faults.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.chunking import Reassembler, transfer_key
from relay.codec import digest
from relay.envelope import ModelEnvelope
from relay.jobspec import Algorithm
from relay.journal import SPOOL_HEADROOM, Journal, SpoolFull
from relay.messaging import Received, dedup_key
from tests.faults import (
    Baselines,
    Deployment,
    Recipe,
    ScratchBroker,
    Trial,
    absent_from_fedavg,
    absent_from_ring,
    close_connections,
    disk_filler,
    fill_spool,
    kill_at,
    kill_while_training,
    mount_tmpfs,
    restart_broker,
    unmount,
)
from tests.test_chunking import chunked

pytestmark = pytest.mark.slow

FEDAVG = Recipe(Algorithm.FEDAVG, rounds=2)
CWT = Recipe(Algorithm.CWT, rounds=2)
QUORUM = Recipe(Algorithm.FEDAVG, rounds=1, min_sites=2, round_timeout_s=10)
"""site-3 never comes: each round closes at its deadline with the other two."""
PAIR = Recipe(Algorithm.FEDAVG, rounds=1, sites=("site-1", "site-2"))
"""The fault-free run QUORUM must match: the same job without site-3."""
SPOOL_DISK = SPOOL_HEADROOM + 32 * 2**20
"""site-2's spool is a tmpfs this big, so that a test can fill it."""


def needs_root() -> None:
    assert os.geteuid() == 0, "mounting a small tmpfs for site-2's spool needs root"


@pytest.fixture(scope="module")
def baselines() -> Baselines:
    """Fault-free outcomes, each run once."""
    return Baselines()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Three sites and the aggregator on a RabbitMQ node of their own (which a test may
    restart without touching the machine's broker); site-2's spool on a small disk of its
    own."""
    needs_root()
    broker = ScratchBroker()
    try:
        deployment = Deployment(tmp_path_factory.mktemp("faults"), broker)
        mount_tmpfs(deployment.spool("site-2"), SPOOL_DISK)
        try:
            deployment.start_all()
            yield deployment
        finally:
            deployment.stop()
            unmount(deployment.spool("site-2"))
    finally:
        broker.stop()


def clean(trial: Trial) -> str:
    """What a failed assertion shows: the trial, each problem on a line."""
    return f"{trial.kind} at {trial.point}:\n" + "\n".join(map(str, trial.problems))


def test_a_site_killed_while_training_retrains_and_the_final_model_is_unchanged(
    deployment: Deployment, baselines: Baselines
) -> None:
    baseline = baselines.get(deployment, FEDAVG)
    trial = kill_while_training(deployment, FEDAVG, baseline, site="site-2", visit=2, delay_s=0.05)
    assert trial.reached and "training or publishing" in trial.point, trial.point
    assert trial.correct, clean(trial)
    assert trial.same_model
    assert "resumes model from aggregator (round 1" in deployment.log("site-2")


def test_a_site_killed_between_two_chunks_of_its_update_sends_it_again_whole(
    deployment: Deployment, baselines: Baselines
) -> None:
    baseline = baselines.get(deployment, FEDAVG)
    chunks = FEDAVG.model_chunks
    # The fifth chunk of its round-1 update is confirmed; the sixth never goes out.
    point = f"publish:update:{chunks + 5}"
    trial = kill_at(deployment, FEDAVG, baseline, party="site-2", point=point, kind="publishing")
    assert trial.reached, trial.point
    assert trial.correct, clean(trial)
    assert trial.same_model


def test_an_aggregator_killed_between_a_job_spec_and_its_initial_model_starts_the_job(
    deployment: Deployment, baselines: Baselines
) -> None:
    baseline = baselines.get(deployment, CWT)
    # The spec is acked and the initial model half taken: the restarted aggregator must still
    # know the spec the remaining chunks belong to.
    point = f"ack:model:{CWT.model_chunks // 2}"
    trial = kill_at(deployment, CWT, baseline, party="aggregator", point=point, kind="accepting")
    assert trial.reached, trial.point
    assert trial.correct, clean(trial)
    assert trial.same_model
    assert not any((deployment.spool("aggregator") / "submitted").iterdir())


def test_connections_force_closed_mid_job_are_rebuilt_and_nothing_is_lost(
    deployment: Deployment, baselines: Baselines
) -> None:
    baseline = baselines.get(deployment, FEDAVG)
    trial = close_connections(
        deployment,
        FEDAVG,
        baseline,
        at_s=[0.0, 0.5],
        choose=lambda names: names,  # every party's, at once, twice
        after_round=1,
    )
    assert trial.reached, trial.point
    assert trial.correct, clean(trial)
    assert trial.same_model
    assert all(deployment.alive(party) for party in ("aggregator", *deployment.sites))


def test_a_broker_restarted_mid_job_is_waited_for_and_nothing_is_lost(
    deployment: Deployment, baselines: Baselines
) -> None:
    baseline = baselines.get(deployment, FEDAVG)
    trial = restart_broker(deployment, FEDAVG, baseline, after_s=0.2, down_s=3.0, after_round=1)
    assert trial.reached, trial.point
    assert trial.correct, clean(trial)
    assert trial.same_model
    assert all(deployment.alive(party) for party in ("aggregator", *deployment.sites))


def test_a_site_that_never_comes_back_leaves_fedavg_to_its_quorum_and_is_recorded_absent(
    deployment: Deployment, baselines: Baselines
) -> None:
    baseline = baselines.get(deployment, PAIR)
    # Checked in the trial: each round closed without site-3 and the record says so, and
    # the final model is that of the same job run by site-1 and site-2 alone.
    trial = absent_from_fedavg(deployment, QUORUM, baseline, site="site-3")
    assert trial.correct, clean(trial)
    assert trial.same_model


def test_a_ring_token_waits_in_an_absent_sites_queue_until_the_site_returns(
    deployment: Deployment, baselines: Baselines
) -> None:
    baseline = baselines.get(deployment, CWT)
    trial = absent_from_ring(deployment, CWT, baseline, site="site-3", back_after_s=2.0)
    assert trial.correct, clean(trial)
    assert trial.same_model


def test_a_full_spool_disk_stops_the_node_naming_it_and_it_finishes_once_space_is_freed(
    deployment: Deployment, baselines: Baselines
) -> None:
    baseline = baselines.get(deployment, FEDAVG)
    # The disk fills while site-2 holds five chunks of round 1's model: it stops (with the
    # reason, checked in the trial), keeping them; freed and restarted, it takes the rest.
    point = f"ack:model:{FEDAVG.model_chunks + 5}"
    mount = deployment.spool("site-2")
    trial = fill_spool(deployment, FEDAVG, baseline, site="site-2", point=point, mount=mount)
    assert trial.reached, trial.point
    assert trial.correct, clean(trial)
    assert "1 partial transfer(s)" in trial.notes[0], trial.notes
    assert trial.same_model


# -- the journal on a full disk, without a broker ----------------------------------------------


def model(payload: bytes, round: int = 0) -> ModelEnvelope:
    return ModelEnvelope(
        job_id="job",
        algorithm=Algorithm.CWT,
        sender="site-1",
        recipient="site-2",
        payload_digest=digest(payload),
        payload_size=len(payload),
        round=round,
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    needs_root()
    mount = tmp_path / "disk"
    mount_tmpfs(mount, 4 * 2**20)
    try:
        yield mount
    finally:
        unmount(mount)


def test_a_message_that_does_not_fit_the_spool_is_not_journalled_and_leaves_nothing(
    small_disk: Path,
) -> None:
    journal = Journal(small_disk)
    payload = b"a few bytes fit"
    fits = model(payload)
    kept = journal.persist(Received(fits, memoryview(payload)), dedup_key(fits))
    filler = disk_filler(small_disk, leave=256 * 1024)
    big = os.urandom(1024 * 1024)  # more than is free
    envelope = model(big, round=1)
    with pytest.raises(SpoolFull, match=f"spool {small_disk}: a write failed"):
        journal.persist(Received(envelope, memoryview(big)), dedup_key(envelope))
    assert sorted(p.name for p in journal.directory.iterdir()) == [
        f"{kept.name}.json",
        f"{kept.name}.payload",
    ]
    with pytest.raises(SpoolFull, match="65 MiB free that a node needs"):
        journal.check_space()
    filler.unlink()
    assert [entry.key for entry, _ in Journal(small_disk).pending()] == [kept.key]


def test_reassembled_chunks_go_back_where_they_were_if_their_record_cannot_be_written(
    small_disk: Path,
) -> None:
    journal = Journal(small_disk)
    chunks = small_disk / "chunks"
    chunks.mkdir()
    payload = os.urandom(64 * 1024)
    whole = chunks / "site-1-m.payload"
    whole.write_bytes(payload)
    envelope = model(payload)
    filler = disk_filler(small_disk, leave=0)
    try:
        with pytest.raises(SpoolFull):
            journal.persist(Received(envelope, memoryview(payload), whole), dedup_key(envelope))
    finally:
        filler.unlink()
    assert whole.read_bytes() == payload  # the redelivered last chunk finds it complete
    assert not list(journal.directory.iterdir())


def test_a_chunk_that_does_not_fit_the_spool_stops_the_node_and_keeps_the_chunks_before_it(
    small_disk: Path,
) -> None:
    chunks = chunked(os.urandom(4 * 64 * 1024), chunk_size=64 * 1024)
    key = transfer_key(chunks[0][0])
    journal = Journal(small_disk)
    reassembler = Reassembler(small_disk / "chunks")
    for chunk in chunks[:2]:
        reassembler.add(*chunk)
    filler = disk_filler(small_disk, leave=0)
    try:
        # Not the chunk's fault: no ChunkError (that would dead-letter the message) but the
        # node's SpoolFull, and what was stored stays.
        with pytest.raises(SpoolFull, match="a write failed"), journal.writing():
            reassembler.add(*chunks[2])
    finally:
        filler.unlink()
    restarted = Reassembler(small_disk / "chunks")
    assert restarted.missing(key) == [2, 3]
    for chunk in chunks[2:]:
        complete = restarted.add(*chunk)
    assert complete is not None and complete.stat().st_size == 4 * 64 * 1024


def test_a_start_cut_short_by_a_full_spool_is_not_counted_against_the_message(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    envelope = model(b"weights")
    entry = journal.persist(Received(envelope, memoryview(b"weights")), dedup_key(envelope))
    counted = journal.attempt(entry, envelope)  # a restart begins the work again ...
    journal.uncount(counted, envelope)  # ... and the disk is full: not a failed attempt
    [(kept, _)] = Journal(tmp_path).pending()
    assert kept.attempts == entry.attempts == 1


def test_a_ledger_line_torn_by_a_crash_is_cut_so_the_next_key_stays_whole(
    tmp_path: Path,
) -> None:
    (tmp_path / "done.log").write_text("job|first\njob|sec")  # torn mid-write
    journal = Journal(tmp_path)
    assert journal.done == {"job|first"}
    entry = journal.persist(Received(model(b""), memoryview(b"")), "job|second")
    journal.complete(entry)
    assert Journal(tmp_path).done == {"job|first", "job|second"}
