"""The four workflows on the embedded federation: real messages, real (tiny) MONAI training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from node.algo import SiteAlgo
from node.models import initial_weights
from node.operate import send_command
from node.simulate import Federation, SimulationConfig
from node.site import AlgoFactory, SiteNode
from relay.codec import digest, encode
from relay.endpoint import Endpoint
from relay.envelope import AGGREGATOR, Command, ModelEnvelope, UpdateEnvelope, to_wire
from relay.frame import encode_frame, headers_of
from relay.jobspec import Algorithm, JobSpec
from relay.messaging import sign
from relay.runner import run_until
from relay.topology import dead_letter_reason
from relay.transport import Message
from relay.workflows.state import Status
from tests.broker import TestBroker

TINY = {"cases_per_site": 5, "volume_size": 16, "width": 4, "depth": 3, "learning_rate": 1e-2}


def config(algorithm: str, **overrides: object) -> SimulationConfig:
    rounds = 1 if algorithm == "swt" else 3
    settings = {"algorithm": algorithm, "rounds": rounds, "local_epochs": 2, **TINY}
    return SimulationConfig.model_validate(settings | overrides)


def drain(endpoint: Endpoint) -> None:
    """Let one endpoint handle everything waiting for it."""
    while endpoint.poll(timeout=0.5):
        pass


def dead_letters(federation: Federation) -> list[Message]:
    """Everything in the dead-letter queue, oldest first."""
    operator = federation.connect("operator")
    messages = []
    while (delivery := operator.get(federation.topology.dead_queue, timeout=0.5)) is not None:
        messages.append(delivery.message)
        operator.ack(delivery)  # with prefetch 1, the next comes only after this one
    operator.close()
    return messages


def mean_dice(per_site: dict[str, dict[str, float]]) -> float:
    return sum(m["dice_mean"] for m in per_site.values()) / len(per_site)


@pytest.mark.parametrize("algorithm", [a.value for a in Algorithm])
def test_each_workflow_improves_dice_over_the_initial_model(
    algorithm: str, build: type[Federation]
) -> None:
    cfg = config(algorithm)
    federation = build.build(cfg)
    job = cfg.job()
    initial = mean_dice(
        {
            name: algo.evaluate([s._reference(job)]).as_dict()
            for s, (name, algo) in zip(federation.sites, federation.baselines.items(), strict=True)
        }
    )
    state = federation.run(job)
    assert state.status is Status.DONE, state.reason
    assert set(state.final_metrics) == set(job.sites)
    final = mean_dice(state.final_metrics)
    assert final > initial + 0.15, (initial, final)
    trained = [m for m in federation.monitor.metrics if m.stage == "trained"]
    assert len(trained) == job.rounds * len(job.sites)
    if algorithm == "ensemble":
        assert len(state.final) == len(job.sites)
    else:
        assert len(state.final) == 1


def test_ring_token_visits_sites_in_order_every_cycle(build: type[Federation]) -> None:
    cfg = config("cwt", rounds=2, local_epochs=1)
    federation = build.build(cfg)
    state = federation.run(cfg.job())
    assert state.status is Status.DONE, state.reason
    visits = [(m.round, m.site) for m in federation.monitor.metrics if m.stage == "trained"]
    sites = list(cfg.job().sites)
    assert visits == [(r, s) for r in range(2) for s in sites]


def publish_raw(
    federation: Federation, user: str, site: str, body: bytes, kind: str = "model"
) -> None:
    transport = federation.connect(user)
    transport.publish(
        f"site.{site}",
        Message(body=body, type=kind, message_id="bad", correlation_id="?", user_id=user),
        exchange=federation.topology.exchange,
    )
    transport.close()


def model_for_site_1(job: JobSpec, payload: bytes = b"", **changes: Any) -> ModelEnvelope:
    """The envelope of ``payload`` from the aggregator to site-1, with ``changes``."""
    fields: dict[str, Any] = {
        "job_id": job.job_id,
        "algorithm": job.algorithm,
        "sender": "aggregator",
        "recipient": "site-1",
        "payload_digest": digest(payload),
        "payload_size": len(payload),
    }
    return ModelEnvelope(**(fields | changes))


def test_malformed_envelopes_are_dead_lettered_and_the_site_keeps_working(
    build: type[Federation],
) -> None:
    cfg = config("fedavg", rounds=1, local_epochs=1)
    federation = build.build(cfg)
    job = cfg.job()
    aggregator = federation.security["aggregator"]
    good = sign(model_for_site_1(job), aggregator)
    forged_sender = model_for_site_1(job, algorithm="cwt", sender="site-3")
    bad_round = to_wire(good) | {"round": -4}
    payload = encode({"w": torch.zeros(2)})
    wrong_model = sign(
        good.model_copy(update={"payload_digest": digest(payload), "payload_size": len(payload)}),
        aggregator,
    )
    publish_raw(federation, "aggregator", "site-1", b"\xc1not msgpack at all")
    publish_raw(
        federation, "aggregator", "site-1", msgpack.packb(bad_round) + b"\xc6\x00\x00\x00\x00"
    )
    publish_raw(federation, "site-2", "site-1", encode_frame(forged_sender, b""))
    # Queued ahead of the job spec: the site does not know the job yet.
    publish_raw(federation, "aggregator", "site-1", encode_frame(wrong_model, payload))
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    # Queued behind the job spec: the job is known, but the payload is tampered with, or
    # the model is not the job's.
    publish_raw(federation, "aggregator", "site-1", encode_frame(good, b"tampered"))
    publish_raw(federation, "aggregator", "site-1", encode_frame(wrong_model, payload))
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    dead = dead_letters(federation)
    reasons = [dead_letter_reason(m.headers) for m in dead]
    assert len(reasons) == 6, reasons
    assert "expected a msgpack map header first" in reasons[0]
    assert "envelope.round: Input should be greater than or equal to 0 (got -4)" in reasons[1]
    assert "differs from the broker user_id 'site-2'" in reasons[2]
    assert "is unknown to site 'site-1'; the job spec must arrive first" in reasons[3]
    assert "payload holds 8 bytes, header says 0" in reasons[4]
    assert "do not match the job's model" in reasons[5]
    assert all(
        m.headers.get("x-first-death-queue") == federation.topology.site_queue("site-1")
        for m in dead
    )
    assert headers_of(good)["sender"] == "aggregator"


def test_fedavg_closes_a_round_with_quorum_when_a_site_is_absent(build: type[Federation]) -> None:
    cfg = config("fedavg", rounds=2, local_epochs=1, min_sites=2, round_timeout_s=0.5)
    federation = build.build(cfg)
    state = federation.run(cfg.job(), absent=frozenset({"site-3"}))
    assert state.status is Status.DONE, state.reason
    assert [r.missing for r in state.rounds] == [["site-3"], ["site-3"]]
    assert {r.closed_by for r in state.rounds} == {"deadline with quorum"}
    assert set(state.final_metrics) == {"site-1", "site-2"}
    assert any("site-3" in note for note in state.late)


def test_fedavg_below_quorum_fails_with_a_clear_reason(build: type[Federation]) -> None:
    cfg = config("fedavg", rounds=1, local_epochs=1, round_timeout_s=0.3)
    federation = build.build(cfg)
    state = federation.run(cfg.job(), absent=frozenset({"site-2", "site-3"}))
    assert state.status is Status.FAILED
    assert "round 0: only 1 site update(s) arrived within 0.3 s" in state.reason
    assert "['site-1']" in state.reason


def test_duplicated_messages_are_handled_once_and_the_copies_refused_as_replays(
    build: type[Federation],
) -> None:
    cfg = config("fedavg", rounds=2, local_epochs=1)
    federation = build.build(cfg)
    job = cfg.job()
    transport = federation.coordinator.transport
    original = transport.publish

    def publish_twice(routing_key: str, message: Message, *, exchange: str) -> None:
        original(routing_key, message, exchange=exchange)
        original(routing_key, message, exchange=exchange)

    transport.publish = publish_twice  # type: ignore[method-assign]
    state = federation.run(job)
    assert state.status is Status.DONE, state.reason
    trained = [m for m in federation.monitor.metrics if m.stage == "trained"]
    assert len(trained) == job.rounds * len(job.sites)
    # A signed message published a second time is a replay, whoever sent it: the copies of
    # the aggregator's messages are refused at the sites, and nothing else is.
    assert federation.coordinator.rejected == []
    for site in federation.sites:
        assert site.rejected, site.name
        assert all(r.startswith("replayed: ") for r in site.rejected), site.rejected


def test_a_late_update_is_recorded_and_not_mixed_in(build: type[Federation]) -> None:
    cfg = config("fedavg", rounds=1, local_epochs=1)
    federation = build.build(cfg)
    job = cfg.job()
    state = federation.run(job)
    assert state.status is Status.DONE
    final = state.final[0]
    site = federation.sites[0]
    site.outbox.send(
        UpdateEnvelope,
        encode(final),
        chunk_size=job.chunk_size,
        job_id=job.job_id,
        algorithm=job.algorithm,
        recipient="aggregator",
        round=0,
        sample_count=3,
    )
    assert federation.coordinator.poll(timeout=5)
    assert len(state.late) == 1 and "not used" in state.late[0]
    assert state.final[0] is final


def test_large_models_travel_in_chunks_through_the_workflow(build: type[Federation]) -> None:
    cfg = config("swt", chunk_size=4096, local_epochs=1)
    federation = build.build(cfg)
    state = federation.run(cfg.job())
    assert state.status is Status.DONE, state.reason
    traffic = [e.outbox.traffic.messages for e in federation.endpoints]
    # The first hop, two more hops and the final token; then the final model to all three.
    assert sum(t["model"] for t in traffic) >= 5 * (1 + 3)
    assert sum(t["model:evaluate"] for t in traffic) >= 5 * 3


def test_a_ring_token_from_the_wrong_sender_or_replayed_is_refused(build: type[Federation]) -> None:
    cfg = config("cwt", rounds=2, local_epochs=1)
    federation = build.build(cfg)
    job = cfg.job()
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    payload = encode(initial_weights(job.model, seed=job.seed))
    envelope = model_for_site_1(job, payload)
    site_1_jobs = federation.sites[0].jobs
    assert not site_1_jobs, "a finished job leaves no state at the site"
    # A site other than the ring's predecessor forging hop 0 of cycle 1:
    forged = envelope.model_copy(update={"sender": "site-2", "round": 1, "message_id": "f" * 32})
    cfg2 = config("cwt", rounds=2, local_epochs=1, seed=1)
    job2 = cfg2.job()
    state2 = federation.coordinator.submit(job2, initial_weights(job2.model, seed=job2.seed))
    forged = forged.model_copy(update={"job_id": job2.job_id})
    replay = envelope.model_copy(update={"job_id": job2.job_id, "message_id": "e" * 32})
    assert federation.sites[0].poll(timeout=5)  # job spec
    assert federation.sites[0].poll(timeout=5)  # the real first token: trained and sent on
    keys = federation.security
    publish_raw(federation, "site-2", "site-1", encode_frame(sign(forged, keys["site-2"]), payload))
    replayed = sign(replay, keys["aggregator"])
    publish_raw(federation, "aggregator", "site-1", encode_frame(replayed, payload))
    run_until(federation.endpoints, lambda: state2.finished)
    assert state2.status is Status.DONE, state2.reason
    reasons = federation.sites[0].rejected
    assert any("must come from 'site-3', got 'site-2'" in r for r in reasons), reasons
    assert any("cycle 0 hop 0 was already trained here" in r for r in reasons), reasons


def test_a_ring_whose_token_never_returns_fails_at_its_deadline(build: type[Federation]) -> None:
    cfg = config("swt", local_epochs=1, round_timeout_s=0.2)
    federation = build.build(cfg)
    state = federation.run(cfg.job(), absent=frozenset({"site-2"}))
    assert state.status is Status.FAILED
    assert "token did not come back within 0.6 s" in state.reason


def test_a_failed_job_is_cancelled_at_every_site(build: type[Federation]) -> None:
    cfg = config("fedavg", rounds=1, local_epochs=1, round_timeout_s=0.2)
    federation = build.build(cfg)
    state = federation.run(cfg.job(), absent=frozenset({"site-3"}))
    assert state.status is Status.FAILED
    for site in federation.sites[:2]:
        drain(site)
        assert not site.jobs and not site.algos


def test_chunks_for_an_unknown_job_are_refused_before_being_stored(
    build: type[Federation],
) -> None:
    cfg = config("swt", local_epochs=1, chunk_size=4096)
    federation = build.build(cfg)
    job = cfg.job()
    payload = encode(initial_weights(job.model, seed=0))
    sender = federation.coordinator
    sender.outbox.send(
        ModelEnvelope,
        payload,
        chunk_size=4096,
        job_id="nobody-runs-this",
        algorithm="swt",
        recipient="site-1",
    )
    site = federation.sites[0]
    drain(site)
    assert site.rejected and all("unknown to site 'site-1'" in r for r in site.rejected)
    assert not list((site.spool / "chunks").iterdir())


@pytest.mark.parametrize("algorithm", ["fedavg", "cwt"])
def test_rabbitmq_and_the_embedded_broker_give_the_same_result(
    algorithm: str, tmp_path: Path
) -> None:
    cfg = config(algorithm, rounds=2, local_epochs=1)
    results = []
    rabbit = TestBroker()
    try:
        for connect in (None, rabbit.connect):
            federation = Federation.build(cfg, tmp_path / str(len(results)), connect=connect)
            try:
                state = federation.run(cfg.job())
            finally:
                federation.close()
            assert state.status is Status.DONE, state.reason
            results.append((state.final_metrics, encode(state.final[0])))
    finally:
        rabbit.delete()
    (memory_metrics, memory_model), (amqp_metrics, amqp_model) = results
    assert amqp_metrics == memory_metrics
    assert digest(amqp_model) == digest(memory_model)


class Crash(Exception):
    """Stands for the process dying mid-training."""


def crashing(factory: AlgoFactory) -> AlgoFactory:
    """Trainers that die whenever they train."""

    def make(spec: JobSpec) -> SiteAlgo:
        algo = factory(spec)

        class Crashing:
            def __getattr__(self, name: str) -> object:
                return getattr(algo, name)

            def train(self, *args: object, **kwargs: object) -> object:
                raise Crash

        return Crashing()  # type: ignore[return-value]

    return make


def test_a_site_that_crashes_mid_training_resumes_from_its_journal(
    build: type[Federation],
) -> None:
    cfg = config("cwt", rounds=2, local_epochs=1)
    federation = build.build(cfg)
    job = cfg.job()
    site2 = federation.sites[1]
    factory = site2.algo_factory
    site2.algo_factory = crashing(factory)
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    with pytest.raises(Crash):
        run_until(federation.endpoints, lambda: state.finished)
    site2.close()  # the process is gone; the token it had acked is only in its journal
    restarted = SiteNode(
        name="site-2",
        algo_factory=factory,
        transport=federation.connect("site-2"),
        topology=federation.topology,
        spool=site2.spool,
        security=federation.security["site-2"],
    )
    assert restarted.jobs == {job.job_id: job}
    assert restarted.resume() == 1
    endpoints = [
        federation.coordinator,
        federation.sites[0],
        restarted,
        federation.sites[2],
        federation.monitor,
    ]
    run_until(endpoints, lambda: state.finished)
    federation.sites[1] = restarted
    assert state.status is Status.DONE, state.reason
    drain(federation.monitor)
    trained = [(m.round, m.site) for m in federation.monitor.metrics if m.stage == "trained"]
    assert trained == [(r, s) for r in range(2) for s in job.sites], "no hop lost or done twice"
    assert not list((restarted.spool / "journal").iterdir())


def test_an_oversize_message_is_dead_lettered_and_the_site_keeps_working(
    build: type[Federation],
) -> None:
    cfg = config("fedavg", rounds=1, local_epochs=1, chunk_size=4096)
    federation = build.build(cfg)
    job = cfg.job()
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    payload = bytes(5000)  # more than the job's 4096 bytes a message, unchunked
    oversize = sign(model_for_site_1(job, payload, round=7), federation.security["aggregator"])
    publish_raw(federation, "aggregator", "site-1", encode_frame(oversize, payload))
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    reasons = [dead_letter_reason(m.headers) for m in dead_letters(federation)]
    assert len(reasons) == 1 and "oversize, 5000 bytes in one message" in reasons[0]


def test_work_that_crashes_on_every_restart_is_given_up_with_a_reason(
    build: type[Federation],
) -> None:
    cfg = config("swt", local_epochs=1)
    federation = build.build(cfg)
    job = cfg.job()
    site1 = federation.sites[0]
    broken = crashing(site1.algo_factory)
    site1.algo_factory = broken
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    with pytest.raises(Crash):
        run_until(federation.endpoints, lambda: state.finished)
    site1.close()
    for _ in range(2):  # restarts 1 and 2 crash again (attempts 2 and 3)
        restarted = SiteNode(
            name="site-1",
            algo_factory=broken,
            topology=federation.topology,
            transport=federation.connect("site-1"),
            spool=site1.spool,
            security=federation.security["site-1"],
        )
        with pytest.raises(Crash):
            restarted.resume()
        restarted.close()
    restarted = SiteNode(
        name="site-1",
        algo_factory=broken,
        topology=federation.topology,
        transport=federation.connect("site-1"),
        spool=site1.spool,
        security=federation.security["site-1"],
    )
    assert restarted.resume() == 1
    assert "was started 3 times and never finished; given up" in restarted.rejected[0]
    assert not list((site1.spool / "journal").glob("*.json"))
    restarted.close()


def test_fedavg_with_server_momentum_moves_past_the_plain_average(
    build: type[Federation],
) -> None:
    plain_cfg = config("fedavg", rounds=2, local_epochs=1)
    momentum_cfg = config("fedavg", rounds=2, local_epochs=1, server_momentum=0.5)
    states = []
    for cfg in (plain_cfg, momentum_cfg):
        federation = build.build(cfg)  # on RabbitMQ, the same queues: one federation at a time
        states.append(federation.run(cfg.job()))
        federation.close()
    plain, moved = states
    assert plain.status is moved.status is Status.DONE, moved.reason
    # Round 1 is the same average; from round 2 on the momentum adds half the last step.
    assert moved.velocity and not plain.velocity
    name = next(n for n, t in moved.reference.items() if t.is_floating_point())
    assert not torch.equal(moved.reference[name], plain.reference[name])


@pytest.mark.parametrize("algorithm", ["fedavg", "ensemble"])
def test_a_job_cancelled_in_its_first_round_resumes_and_completes(
    algorithm: str, build: type[Federation]
) -> None:
    # Retrained from the same model with the same seed, a site sends the very update it sent
    # before the cancel: the resumed job must still take it.
    cfg = config(algorithm, rounds=1, local_epochs=1)
    federation = build.build(cfg)
    job = cfg.job()
    coordinator, sites = federation.coordinator, federation.sites
    state = coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    drain(sites[0])
    drain(sites[1])
    drain(coordinator)
    assert len(state.contributors) == 2
    operator = federation.connect(AGGREGATOR)  # what `fedrelay job cancel/resume` does
    security = federation.security[AGGREGATOR]
    topology = federation.topology
    send_command(operator, topology, job.job_id, Command.CANCEL, security=security)
    drain(coordinator)
    assert state.status is Status.CANCELLED
    for site in sites:
        drain(site)
    drain(coordinator)  # site-3's update, trained before it heard of the cancel: late
    assert state.status is Status.CANCELLED and state.late
    send_command(operator, topology, job.job_id, Command.RESUME, security=security)
    assert coordinator.poll(timeout=5) and state.status is Status.RUNNING
    run_until([coordinator, *sites], lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    assert state.resumes == 1
    assert len(state.rounds) == 1 and not state.rounds[0].missing
    assert coordinator.rejected == []
    operator.close()
