"""The aggregator's durable job state: what it writes per update, and restarts from it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from node.models import initial_weights
from node.simulate import Federation
from relay.envelope import AGGREGATOR
from relay.runner import run_until
from relay.workflows.coordinator import Coordinator
from relay.workflows.state import JobState, Status
from relay.workflows.store import LOG_FILE, STATE_FILE, JobStore, ModelFile
from tests.test_workflows import config, drain


def restart(federation: Federation) -> Coordinator:
    """The aggregator as a new process finds it: a new connection, its jobs from the spool."""
    old = federation.coordinator
    old.transport.close()
    federation.coordinator = Coordinator(
        transport=federation.connect(AGGREGATOR),
        topology=federation.topology,
        spool=old.spool,
        security=federation.security[AGGREGATOR],
    )
    federation.coordinator.resume()
    return federation.coordinator


def member_files(folder: Path) -> dict[str, int]:
    """The job's member files, by name, with their inode (a rewrite makes a new one)."""
    return {path.name: path.stat().st_ino for path in folder.glob("member.*")}


def test_robust_updates_are_spooled_once_each_and_a_restarted_aggregator_ends_the_same(
    build: type[Federation],
) -> None:
    cfg = config("fedavg", sites=4, rounds=2, local_epochs=1, aggregation="median")
    uninterrupted = build.build(cfg)
    expected = uninterrupted.run(cfg.job())
    uninterrupted.close()  # on RabbitMQ the next federation uses the same queues
    assert expected.status is Status.DONE, expected.reason

    federation = build.build(cfg)
    job = cfg.job()
    coordinator, sites = federation.coordinator, federation.sites
    state = coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    folder = coordinator.store.directory / job.job_id
    drain(sites[0])
    drain(sites[1])
    drain(coordinator)
    assert sorted(state.contributors) == ["site-1", "site-2"]
    # Each update is on disk in a file of its own and read from there, not held in memory.
    assert all(isinstance(member, ModelFile) for member in state.members.values())
    first = member_files(folder)
    assert len(first) == 2
    drain(sites[2])
    drain(coordinator)
    later = member_files(folder)
    assert len(later) == 3
    assert all(later.get(name) == inode for name, inode in first.items())  # never rewritten

    # Killed between two updates, restarted from its spool: it goes on in the same round.
    restarted = restart(federation).jobs[job.job_id]
    assert restarted.round == 0 and restarted.contributors == state.contributors
    assert restarted.lineage == state.lineage and restarted.applied == state.applied
    run_until(federation.endpoints, lambda: restarted.finished)
    assert restarted.status is Status.DONE, restarted.reason
    assert [r.round for r in restarted.rounds] == [0, 1]
    for name, tensor in expected.final[0].items():
        assert torch.equal(restarted.final[0][name], tensor), name
    assert not member_files(folder)  # a finished job keeps its record, not its models


def test_a_save_cut_short_by_a_crash_is_not_part_of_the_restored_state(tmp_path: Path) -> None:
    spec = config("fedavg", rounds=2).job()
    job = JobState(spec, initial_weights(spec.model, seed=spec.seed))
    job.dirty.add("reference")
    store = JobStore(tmp_path)
    for i in range(3):
        job.lineage.append({"step": "train", "output": f"model-{i}"})
        job.applied[f"message-{i}"] = None
        store.save(job)
    folder = store.directory / spec.job_id
    saved = json.loads((folder / STATE_FILE).read_text())
    assert "lineage" not in saved  # what grows is in the log, not rewritten at every save
    # A save that appended to the log, then crashed before replacing state.json.
    with (folder / LOG_FILE).open("a") as log:
        log.write('{"lineage": [{"step": "train", "output": "never-sa')
    (restored,) = JobStore(tmp_path).load()
    assert restored.lineage == job.lineage and restored.applied == job.applied

    # The next save goes on from where the state was, dropping the torn tail.
    restored.lineage.append({"step": "aggregate", "output": "model-3"})
    store.save(restored)
    (again,) = JobStore(tmp_path).load()
    assert [r["output"] for r in again.lineage] == [f"model-{i}" for i in range(4)]
    assert list(again.applied) == [f"message-{i}" for i in range(3)]
    for name, tensor in job.reference.items():
        assert torch.equal(again.reference[name], tensor)
