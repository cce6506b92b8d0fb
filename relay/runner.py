"""Driving endpoints that share one thread: the embedded (in-process) federation's loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from relay.endpoint import Endpoint
from relay.errors import JobFailed

IDLE_SLEEP_S = 0.005
"""Pause between quiet passes: messages on a real broker take a moment to arrive."""

MAX_SLEEP_S = 0.05

STALL_AFTER_S = 3.0
"""Quiet this long, with no deadline pending, and the federation is declared stalled."""


def run_until(
    endpoints: Sequence[Endpoint],
    done: Callable[[], bool],
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    stall_after_s: float = STALL_AFTER_S,
) -> None:
    """Deliver messages to ``endpoints`` one at a time, in turn, until ``done()``.

    When no endpoint has a message, each endpoint's deadlines are checked. If nothing arrives
    for ``stall_after_s`` and no deadline is pending, the federation cannot progress:
    JobFailed says so instead of hanging.
    """
    quiet_since: float | None = None
    while not done():
        progressed = False
        for endpoint in endpoints:
            progressed = endpoint.poll() or progressed
        if progressed:
            quiet_since = None
            continue
        now = clock()
        deadlines = [d for e in endpoints if (d := e.tick(now)) is not None]
        if done():
            return
        quiet_since = now if quiet_since is None else quiet_since
        if deadlines:
            quiet_since = None
            sleep(min(MAX_SLEEP_S, max(IDLE_SLEEP_S, min(deadlines) - clock())))
        elif now - quiet_since > stall_after_s:
            raise JobFailed(
                "the federation stalled: no message is in flight and no deadline is pending. "
                "A site may have refused a message (see the dead-letter queue)."
            )
        else:
            sleep(IDLE_SLEEP_S)
