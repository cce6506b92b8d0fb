"""A test hook: a node freezes itself at a chosen transport step, for fault-injection tests.

Off unless ``FEDRELAY_TEST_FREEZE_AT`` is set in a node's or the aggregator's environment
(production never sets it; without it the plain :class:`AmqpTransport` is used, unchanged).
The variable names a step, a message kind (the AMQP ``type``: ``model``, ``update``,
``lineage``, …, or ``*`` for any) and an occurrence, counted in this process:

- ``publish:update:3``: right after the broker confirmed the third ``update`` message (a
  chunk counts as one), before the next is published;
- ``ack:model:5``: right before acking the fifth ``model`` message taken from the queue
  (stored or journalled, not yet acked).

There the process stops itself with SIGSTOP, so that a harness (``tests/faults.py``) can
SIGKILL it at exactly that point, or change the world (fill its disk) and SIGCONT it. A
timer or a log line could not place a kill between two chunks of one message.

``@<file>`` instead of a point reads the point from that file, again whenever the file
changes (counting afresh), and none while it is empty: a harness moves the point from trial
to trial without restarting the process.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from relay.errors import ConfigError
from relay.transport import Delivery, Message
from relay.transport.amqp import AmqpTransport, BrokerSettings

log = logging.getLogger(__name__)

FREEZE_ENV = "FEDRELAY_TEST_FREEZE_AT"
"""The environment variable that turns the hook on (no ``__``: it is no configuration key)."""

FROZEN = "test freeze point reached"
"""Logged, with the point, just before the process stops itself."""

_POINT = re.compile(r"(?P<step>publish|ack):(?P<kind>\*|[a-z_]+):(?P<occurrence>[1-9][0-9]*)")


@dataclass(frozen=True)
class FreezePoint:
    """Where to freeze: the ``occurrence``-th ``step`` (publish or ack) of a ``kind`` message."""

    step: str
    kind: str
    occurrence: int

    @classmethod
    def parse(cls, text: str) -> FreezePoint:
        """``step:kind:occurrence``; ConfigError names the variable and the form expected."""
        match = _POINT.fullmatch(text.strip())
        if match is None:
            raise ConfigError(
                f"{FREEZE_ENV}={text!r}: expected publish|ack:<message type or *>:<n >= 1>, "
                "e.g. publish:update:3 (a test hook; unset it outside fault-injection tests)"
            )
        return cls(match["step"], match["kind"], int(match["occurrence"]))

    def __str__(self) -> str:
        return f"{self.step}:{self.kind}:{self.occurrence}"


class FreezeSource:
    """The point to freeze at: fixed, or read from a file whenever the file changes."""

    def __init__(self, text: str) -> None:
        self._file = Path(text[1:]) if text.startswith("@") else None
        self._point = None if self._file is not None else FreezePoint.parse(text)
        self._seen: tuple[int, int] | None = None
        self.generation = 0
        """Counts the file's changes: each is a new point, counted from zero."""

    def current(self) -> FreezePoint | None:
        """The point now; a changed file's point is parsed anew (None when it is empty)."""
        if self._file is None:
            return self._point
        try:
            stat = self._file.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = (0, 0)
        if seen != self._seen:
            self._seen = seen
            self.generation += 1
            text = self._file.read_text().strip() if seen != (0, 0) else ""
            self._point = FreezePoint.parse(text) if text else None
        return self._point


def freeze_source(environ: Mapping[str, str] | None = None) -> FreezeSource | None:
    """Where the environment says to freeze, or None (always, outside tests)."""
    text = (os.environ if environ is None else environ).get(FREEZE_ENV)
    return None if text is None else FreezeSource(text)


class FreezingTransport(AmqpTransport):
    """:class:`AmqpTransport` that stops its process at a :class:`FreezePoint`."""

    def __init__(self, settings: BrokerSettings, source: FreezeSource) -> None:
        super().__init__(settings)
        self.freeze_source = source
        self._freeze_generation = 0
        self._freeze_count = 0

    def publish(self, routing_key: str, message: Message, *, exchange: str) -> None:
        """Publish (confirmed), then freeze if this is the point."""
        super().publish(routing_key, message, exchange=exchange)
        self._reached("publish", message)

    def ack(self, delivery: Delivery) -> None:
        """Freeze first if this is the point, then ack."""
        self._reached("ack", delivery.message)
        super().ack(delivery)

    def _reached(self, step: str, message: Message) -> None:
        point = self.freeze_source.current()
        if self.freeze_source.generation != self._freeze_generation:
            self._freeze_generation, self._freeze_count = self.freeze_source.generation, 0
        if point is None or point.step != step or point.kind not in ("*", message.type):
            return
        self._freeze_count += 1
        if self._freeze_count == point.occurrence:
            log.warning("%s: %s (message %s)", FROZEN, point, message.message_id)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGSTOP)


def transport(settings: BrokerSettings) -> AmqpTransport:
    """The node's transport: plain, or freezing where a fault-injection test asks."""
    source = freeze_source()
    return AmqpTransport(settings) if source is None else FreezingTransport(settings, source)
