"""Ring routing for single and cyclic weight transfer.

Each site sends the token on itself (peer to peer). CWT follows Chang et al., "Distributed
deep learning networks among institutions for medical imaging" (JAMIA 2018): the model visits
every site in a fixed order for several cycles; SWT is a single cycle.

A site that does not take the token is waited for (``absent_site`` wait: the token is safe in
its durable queue), or, after ``hop_timeout_s``, skipped: its sender sends the token on to the
stop after it, and under ``revisit`` back to it at the cycle's end. A hop that arrives after
its site was skipped finds the next site already past that position and is refused as stale,
so a late site cannot fork the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.envelope import AGGREGATOR
from relay.errors import EnvelopeError
from relay.jobspec import AbsentSite, JobSpec


@dataclass(frozen=True)
class Stop:
    """Where the token goes next: a site (or the aggregator, after the last hop)."""

    recipient: str
    round: int
    hop: int
    revisit: tuple[str, ...] = ()
    """Under absent_site revisit: sites skipped earlier in this cycle, to visit at its end."""


def expected_hop(job: JobSpec, site: str, *, round: int, hop: int) -> None:
    """Raise EnvelopeError unless ``site`` is the ring position ``hop`` in a valid cycle (or,
    under absent_site revisit, a revisit after the cycle's last position)."""
    if site not in job.sites:
        raise EnvelopeError(f"site {site!r} is not on job {job.job_id}'s ring {list(job.sites)}")
    position, sites = job.sites.index(site), len(job.sites)
    revisit = job.absent_site is AbsentSite.REVISIT and sites <= hop < 2 * sites
    if (hop != position and not revisit) or round >= job.rounds:
        raise EnvelopeError(
            f"envelope.hop/round: got hop {hop} of cycle {round}, but {site!r} is hop {position} "
            f"and the job has {job.rounds} cycle(s); the token was misrouted or is stale"
        )


def next_stop(job: JobSpec, *, round: int, hop: int, revisit: tuple[str, ...] = ()) -> Stop:
    """Where the site at ring position ``hop`` of cycle ``round`` sends the token after
    training it: the next position, the sites left to revisit, the next cycle, or the
    aggregator after the last."""
    if hop + 1 < len(job.sites):
        return Stop(job.sites[hop + 1], round, hop + 1, revisit)
    if revisit:
        return Stop(revisit[0], round, hop + 1, revisit[1:])
    if round + 1 < job.rounds:
        return Stop(job.sites[0], round + 1, 0)
    return Stop(AGGREGATOR, round, hop + 1)


def skip(job: JobSpec, stop: Stop) -> Stop:
    """Where the token goes instead when ``stop``'s site has not taken it in time: the stop
    after it. Under revisit the site is kept for the cycle's end, once: a site absent at its
    revisit too is skipped for the cycle."""
    revisit = stop.revisit
    if job.absent_site is AbsentSite.REVISIT and stop.hop < len(job.sites):
        revisit += (stop.recipient,)
    return next_stop(job, round=stop.round, hop=stop.hop, revisit=revisit)


def senders(job: JobSpec, *, round: int, hop: int) -> frozenset[str]:
    """Who may send the token arriving at (``round``, ``hop``): the stop before it; once
    sites can be skipped, any site of the ring (a skipped site's sender sends it on)."""
    if job.absent_site is AbsentSite.WAIT:
        return frozenset({previous_stop(job, round=round, hop=hop)})
    # Revisit hops run past the ring's last position: no one site comes before them.
    starts = (round, hop) == (0, 0)
    return frozenset(job.sites) | ({AGGREGATOR} if starts else set())


def check_revisit(job: JobSpec, *, hop: int, revisit: tuple[str, ...]) -> None:
    """Raise EnvelopeError unless a token's ``revisit`` list can be this job's: empty unless
    absent_site is revisit; else sites of the ring, each once, that fit in the cycle's
    revisit hops after ``hop``."""
    if not revisit:
        return
    if job.absent_site is not AbsentSite.REVISIT:
        raise EnvelopeError(
            f"envelope.revisit: {list(revisit)} on a token of a job whose absent_site is "
            f"{job.absent_site}; only revisit sends skipped sites along"
        )
    unknown = [s for s in revisit if s not in job.sites]
    if unknown or len(set(revisit)) != len(revisit):
        raise EnvelopeError(
            f"envelope.revisit: {list(revisit)} must name sites of the ring {list(job.sites)}, "
            "each once"
        )
    if hop + len(revisit) >= 2 * len(job.sites):
        raise EnvelopeError(
            f"envelope.revisit: {len(revisit)} site(s) to revisit after hop {hop} do not fit "
            f"in a cycle of {len(job.sites)} sites"
        )


def check_final(job: JobSpec, sender: str, *, round: int, hop: int) -> None:
    """Raise EnvelopeError unless (``sender``, ``round``, ``hop``) can be the ring's last
    hop, the one that brings the token to the aggregator."""
    sites = len(job.sites)
    if job.absent_site is AbsentSite.WAIT:
        fits = (sender, round, hop) == (job.sites[-1], job.rounds - 1, sites)
        expected = f"from {job.sites[-1]!r} after cycle {job.rounds - 1} (hop {sites})"
    else:
        fits = sender in job.sites and round == job.rounds - 1 and sites <= hop <= 2 * sites
        expected = f"from a site of the ring after cycle {job.rounds - 1}"
    if not fits:
        raise EnvelopeError(
            f"envelope: the aggregator takes one model from a running ring job, {expected}; "
            f"got one from {sender!r}, cycle {round}, hop {hop}"
        )


def previous_stop(job: JobSpec, *, round: int, hop: int) -> str:
    """Who sends the token that arrives at ring position ``hop`` of cycle ``round``: the site
    before it, the last site of the previous cycle, or the aggregator, which starts the ring."""
    if hop > 0:
        return job.sites[hop - 1]
    return job.sites[-1] if round > 0 else AGGREGATOR


def arrival_before(job: JobSpec, *, round: int, hop: int) -> tuple[int, int] | None:
    """Where (cycle, hop) the sender of the token arriving at (``round``, ``hop``) received it;
    None when the aggregator sent it (the ring's start)."""
    if hop > 0:
        return round, hop - 1
    return (round - 1, len(job.sites) - 1) if round > 0 else None


def reference_stop(job: JobSpec, stop: Stop) -> Stop | None:
    """Where a site sends a copy of the token it sends to ``stop``, as the reference for the
    ring gate: the stop after it, unless that is the end."""
    if stop.recipient == AGGREGATOR:
        return None
    after = next_stop(job, round=stop.round, hop=stop.hop)
    return None if after.recipient == AGGREGATOR else after
