"""A ring site that is absent: waited for, skipped after the hop timeout, or revisited."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from pydantic import ValidationError

from node.models import initial_weights
from node.simulate import Federation, SimulationConfig
from relay.envelope import AGGREGATOR
from relay.errors import EnvelopeError
from relay.jobspec import AbsentSite, JobSpec
from relay.runner import run_until
from relay.workflows.ring import Stop, check_revisit, next_stop, senders, skip
from relay.workflows.state import JobState, Status
from tests.test_workflows import config, dead_letters, drain

TIMEOUT_S = 0.4


def ring(algorithm: str = "cwt", absent: str = "skip", **overrides: object) -> SimulationConfig:
    timeout = None if absent == "wait" else TIMEOUT_S
    settings: dict[str, object] = {"absent_site": absent, "hop_timeout_s": timeout}
    return config(algorithm, local_epochs=1, **(settings | overrides))


def hops(state: JobState) -> list[tuple[str, int, int]]:
    """(site, cycle, hop) of every training step on record, in order."""
    steps = [r for r in state.lineage if r["step"] == "train"]
    return [(r["sender"], r["round"], r["hop"]) for r in steps]


def site(federation: Federation, name: str) -> int:
    return [s.name for s in federation.sites].index(name)


def test_the_ring_route_skips_and_revisits_by_the_job_s_policy() -> None:
    sites = ("a", "b", "c", "d")
    cwt = JobSpec(algorithm="cwt", sites=sites, rounds=2, absent_site="revisit", hop_timeout_s=1)
    # b is skipped at hop 1: the token goes to c, carrying b to revisit after d.
    after_b = skip(cwt, Stop("b", 0, 1))
    assert after_b == Stop("c", 0, 2, ("b",))
    assert next_stop(cwt, round=0, hop=2, revisit=("b",)) == Stop("d", 0, 3, ("b",))
    assert next_stop(cwt, round=0, hop=3, revisit=("b",)) == Stop("b", 0, 4)
    # Absent at its revisit too: skipped for the cycle, not revisited again.
    assert skip(cwt, Stop("b", 0, 4)) == Stop("a", 1, 0)
    # The last site of the last cycle: revisited once more, else the token goes home.
    assert skip(cwt, Stop("d", 1, 3)) == Stop("d", 1, 4)
    assert skip(cwt, Stop("d", 1, 4)) == Stop(AGGREGATOR, 1, 5)
    plain = cwt.model_copy(update={"absent_site": AbsentSite.SKIP})
    assert skip(plain, Stop("b", 0, 1)) == Stop("c", 0, 2)
    assert skip(plain, Stop("d", 1, 3)) == Stop(AGGREGATOR, 1, 4)


def test_two_skipped_sites_are_revisited_in_turn_and_a_token_s_revisit_list_is_checked() -> None:
    cwt = JobSpec(
        algorithm="cwt",
        sites=("a", "b", "c", "d"),
        rounds=1,
        absent_site="revisit",
        hop_timeout_s=1,
    )
    after_b = skip(cwt, Stop("b", 0, 1))
    after_c = skip(cwt, Stop(after_b.recipient, after_b.round, after_b.hop, after_b.revisit))
    assert after_c == Stop("d", 0, 3, ("b", "c"))
    assert next_stop(cwt, round=0, hop=3, revisit=("b", "c")) == Stop("b", 0, 4, ("c",))
    assert next_stop(cwt, round=0, hop=4, revisit=("c",)) == Stop("c", 0, 5)
    # The second revisit's hop lies past the ring's last position: any ring site may send it.
    assert senders(cwt, round=0, hop=5) == frozenset(cwt.sites)
    check_revisit(cwt, hop=3, revisit=("b", "c"))
    for revisit, message in [
        (("b", "b"), "each once"),
        (("x",), "must name sites of the ring"),
        (("a", "c", "d"), "do not fit"),  # after hop 5, revisit hops 6 and 7 are left
    ]:
        with pytest.raises(EnvelopeError, match=message):
            check_revisit(cwt, hop=5, revisit=revisit)
    wait = cwt.model_copy(update={"absent_site": AbsentSite.WAIT, "hop_timeout_s": None})
    with pytest.raises(EnvelopeError, match="only revisit sends skipped sites along"):
        check_revisit(wait, hop=1, revisit=("b",))


def test_with_revisit_two_sites_back_after_their_skips_train_in_turn_at_the_cycle_s_end(
    build: type[Federation],
) -> None:
    cfg = ring(absent="revisit", rounds=1, sites=4)
    federation = build.build(cfg)
    job = cfg.job()
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    away = ("site-2", "site-3")
    present = [e for e in federation.endpoints if e.name not in away]
    fourth = federation.sites[site(federation, "site-4")]
    run_until(present, lambda: fourth._ring_position.get(job.job_id) == (0, 3))
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    assert hops(state) == [("site-1", 0, 0), ("site-4", 0, 3), ("site-2", 0, 4), ("site-3", 0, 5)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"algorithm": "fedavg", "absent_site": "skip", "hop_timeout_s": 1}, "swt and cwt only"),
        ({"algorithm": "cwt", "absent_site": "skip"}, "needs 'hop_timeout_s'"),
        ({"algorithm": "cwt", "hop_timeout_s": 5}, "is for 'absent_site' skip or revisit"),
        (
            {"algorithm": "cwt", "absent_site": "revisit", "hop_timeout_s": 1, "ring_gate": 0.1},
            "cannot be combined",
        ),
    ],
)
def test_an_absent_site_policy_that_cannot_work_is_refused_with_the_fix(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate({"sites": ["a", "b", "c"], "rounds": 2} | settings)


def test_with_skip_the_token_passes_an_absent_site_and_the_job_completes(
    build: type[Federation],
) -> None:
    cfg = ring(rounds=2)
    federation = build.build(cfg)
    job = cfg.job()
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    present = [e for e in federation.endpoints if e.name != "site-2"]
    run_until(present, lambda: state.status is not Status.RUNNING)
    # site-2 is back for the final model's evaluation.
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    assert hops(state) == [
        ("site-1", 0, 0),
        ("site-3", 0, 2),
        ("site-1", 1, 0),
        ("site-3", 1, 2),
    ]
    # The hops that site-2 never took expired in its queue: it found nothing of them.
    assert site(federation, "site-2") not in [h[0] for h in hops(state)]
    reasons = [m.headers.get("x-first-death-reason") for m in dead_letters(federation)]
    assert reasons.count("expired") == 2, reasons
    assert not any(s.handoffs.pending() for s in federation.sites)


def test_with_revisit_a_site_back_after_its_skip_trains_at_the_cycle_s_end(
    build: type[Federation],
) -> None:
    cfg = ring(absent="revisit", rounds=2)
    federation = build.build(cfg)
    job = cfg.job()
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    present = [e for e in federation.endpoints if e.name != "site-2"]
    third = federation.sites[site(federation, "site-3")]
    run_until(present, lambda: third._ring_position.get(job.job_id) == (0, 2))
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    assert hops(state) == [
        ("site-1", 0, 0),
        ("site-3", 0, 2),
        ("site-2", 0, 3),  # the revisit, after the cycle's last site
        ("site-1", 1, 0),
        ("site-2", 1, 1),
        ("site-3", 1, 2),
    ]


def test_with_wait_the_token_waits_in_the_queue_of_a_site_that_comes_back(
    build: type[Federation],
) -> None:
    cfg = ring("swt", absent="wait")
    federation = build.build(cfg)
    job = cfg.job()
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    present = [e for e in federation.endpoints if e.name != "site-2"]
    first = federation.sites[site(federation, "site-1")]
    run_until(present, lambda: not first.journal.pending() and bool(hops(state)))
    time.sleep(2 * TIMEOUT_S)  # long past any hop timeout: with wait, nothing moves on
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    assert [h[0] for h in hops(state)] == ["site-1", "site-2", "site-3"]


def test_a_site_that_takes_the_token_after_its_skip_cannot_fork_the_ring(
    build: type[Federation],
) -> None:
    cfg = ring("swt", hop_timeout_s=60)  # long enough for the copy not to expire unread
    federation = build.build(cfg)
    job = cfg.job()
    first, second, third = federation.sites
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    run_until([federation.coordinator, first], lambda: bool(first.handoffs.pending()))
    # site-2 takes the token just as site-1 gives up on it: both send hop 2 on to site-3.
    while job.job_id not in second._ring_position:
        assert second.poll(timeout=5)
    first.tick(time.time() + 600)
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    # site-3 trained the first hop 2 to arrive; the other was refused as stale (or expired
    # unread), and site-1, told late that site-2 had the token, let its copy go.
    assert [h[0] for h in hops(state)] == ["site-1", "site-2", "site-3"]
    assert len([r for r in state.lineage if r["step"] == "final"]) == 1
    drain(third)
    stale = [r for r in third.rejected if "was already trained here" in r]
    dead = dead_letters(federation)
    expired = [m for m in dead if m.headers.get("x-first-death-reason")]
    assert len(stale) + len(expired) == 1, (third.rejected, [m.headers for m in dead])
    assert not first.handoffs.pending()


def test_a_site_that_refuses_a_late_token_as_stale_tells_its_sender_not_to_skip_it(
    build: type[Federation],
) -> None:
    cfg = ring("swt", hop_timeout_s=60)
    federation = build.build(cfg)
    job = cfg.job()
    first, second, third = federation.sites
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    run_until([federation.coordinator, first], lambda: bool(first.handoffs.pending()))
    first.tick(time.time() + 600)  # site-1 gives up on site-2 and sends its copy on ...
    while job.job_id not in third._ring_position:
        assert third.poll(timeout=5)  # ... which site-3 trains
    while not second.handoffs.pending():
        assert second.poll(timeout=5)  # site-2, back, trains the token it was sent
    drain(third)  # and site-3 refuses site-2's as stale, telling site-2 it is there
    drain(second)
    assert any("was already trained here" in r for r in third.rejected)
    assert not second.handoffs.pending()  # so site-2 will not skip site-3 and fork the ring
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    # The model that finished is the one that went on: site-2's late training is not in it.
    assert [h[0] for h in hops(state)] == ["site-1", "site-3"]


def test_a_hand_off_cut_short_while_its_token_was_published_is_sent_again_on_restart(
    build: type[Federation],
) -> None:
    cfg = ring("swt", hop_timeout_s=60)
    federation = build.build(cfg)
    job = cfg.job()
    first, second, _ = federation.sites
    state = federation.coordinator.submit(job, initial_weights(job.model, seed=job.seed))
    assert second.poll(timeout=5)  # the job spec
    run_until([federation.coordinator, first], lambda: bool(first.handoffs.pending()))
    # The token site-2 was sent never arrives whole (the publish was cut short) ...
    lost = second.transport.get(second.queue, timeout=5)
    assert lost is not None and lost.message.type == "model"
    second.transport.ack(lost)
    [held] = first.handoffs.pending()
    first.handoffs.hold(replace(held, sent=False))  # ... while site-1 was still publishing it
    assert first.resume() == 0
    run_until(federation.endpoints, lambda: state.finished)
    assert state.status is Status.DONE, state.reason
    assert [h[0] for h in hops(state)] == ["site-1", "site-2", "site-3"]
    assert not any(s.handoffs.pending() for s in federation.sites)
