"""Driving endpoints that share one thread: the embedded (in-process) federation's loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from relay.endpoint import Endpoint
from relay.errors import JobFailed

MAX_SLEEP_S = 0.05


def run_until(
    endpoints: Sequence[Endpoint],
    done: Callable[[], bool],
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Deliver messages to ``endpoints`` one at a time, in turn, until ``done()``.

    When no endpoint has a message, each endpoint's deadlines are checked. If nothing is in
    flight and no deadline is pending, the federation cannot progress: JobFailed says so
    instead of hanging.
    """
    quiet_passes = 0
    while not done():
        progressed = False
        for endpoint in endpoints:
            progressed = endpoint.poll() or progressed
        if progressed:
            quiet_passes = 0
            continue
        now = clock()
        deadlines = [d for e in endpoints if (d := e.tick(now)) is not None]
        quiet_passes += 1
        if done():
            return
        if deadlines:
            sleep(min(MAX_SLEEP_S, max(0.0, min(deadlines) - clock())))
        elif quiet_passes > 1:
            raise JobFailed(
                "the federation stalled: no message is in flight and no deadline is pending. "
                "A site may have refused a message (see the dead-letter queue)."
            )
