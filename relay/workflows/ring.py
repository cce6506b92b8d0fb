"""Ring routing for single and cyclic weight transfer.

Each site sends the token on itself (peer to peer). CWT follows Chang et al., "Distributed
deep learning networks among institutions for medical imaging" (JAMIA 2018): the model visits
every site in a fixed order for several cycles; SWT is a single cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.envelope import AGGREGATOR
from relay.errors import EnvelopeError
from relay.jobspec import JobSpec


@dataclass(frozen=True)
class Stop:
    """Where the token goes next: a site (or the aggregator, after the last hop)."""

    recipient: str
    round: int
    hop: int


def expected_hop(job: JobSpec, site: str, *, round: int, hop: int) -> None:
    """Raise EnvelopeError unless ``site`` is the ring position ``hop`` in a valid cycle."""
    if site not in job.sites:
        raise EnvelopeError(f"site {site!r} is not on job {job.job_id}'s ring {list(job.sites)}")
    position = job.sites.index(site)
    if hop != position or round >= job.rounds:
        raise EnvelopeError(
            f"envelope.hop/round: got hop {hop} of cycle {round}, but {site!r} is hop {position} "
            f"and the job has {job.rounds} cycle(s); the token was misrouted or is stale"
        )


def next_stop(job: JobSpec, site: str, *, round: int) -> Stop:
    """Where ``site`` sends the token after training it in cycle ``round``."""
    following = job.next_site(site)
    if following is not None:
        return Stop(following, round, job.sites.index(following))
    if round + 1 < job.rounds:
        return Stop(job.sites[0], round + 1, 0)
    return Stop(AGGREGATOR, round, len(job.sites))


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


def reference_stop(job: JobSpec, recipient: str, *, round: int) -> Stop | None:
    """Where a site sends a copy of the token it sends ``recipient`` for cycle ``round``, as
    the reference for the ring gate: the stop after ``recipient``'s, unless that is the end."""
    if recipient == AGGREGATOR:
        return None
    after = next_stop(job, recipient, round=round)
    return None if after.recipient == AGGREGATOR else after
