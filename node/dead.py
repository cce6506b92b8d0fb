"""A federation's dead letters: listing them, showing one, and replaying one once its cause
is fixed (``fedrelay dead list|show|replay``).

A dead letter is a message a party refused (it republished it to the dead-letter exchange
with the reason in ``x-fedrelay-reason``, see ``AmqpTransport.reject``) or one the broker
gave up on (delivery limit; ``x-death``). Listing and showing read the envelope header only:
the management API returns each body cut after :data:`HEAD_BYTES`, so weights leave the
broker only when ``show --payload`` writes them to a file.

RabbitMQ has no read of a quorum queue that leaves it alone: a read takes messages
(``basic.get``) and gives them back, and a quorum queue appends what it gets back at its
tail. So every read here takes *all* the dead letters and gives them back in the order taken,
which keeps the queue's order (reading only the first few would move them behind the rest).
The dead queue has no delivery limit, so being read does not wear a dead letter out.

Replay takes every dead letter, republishes the chosen message (every chunk, in chunk order)
byte for byte under its original sender's ``user_id`` to the inbox it was refused from, and
acks it only after the broker confirmed the republish; the others go back, in order. Only a
broker user with the ``impersonator`` tag may publish under another user's ``user_id``; the
envelope's signature, untouched, still proves who sent it, and the receiver drops (or, signed,
refuses as replayed) a message it has handled before.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack
from pydantic import SecretStr

from node.config import FederationConfig
from node.operate import ManagementApi, quote
from node.provision import operator_user
from relay.envelope import AGGREGATOR, Envelope, parse_envelope, to_wire
from relay.errors import AccessRefused, FedrelayError, InvalidInput
from relay.frame import decode_frame
from relay.topology import (
    ORIGINAL_USER_HEADER,
    REASON_HEADER,
    Topology,
    dead_letter_reason,
    site_key,
)
from relay.transport import Delivery, Message
from relay.transport.amqp import AmqpTransport

HEAD_BYTES = 64 * 1024
"""Bytes of each body read to list or show it: the envelope header (a model's is under
2 KiB; only events with long details come near this), never more than a sliver of payload."""

PEEK_MARGIN = 1000
"""Messages asked for beyond the queue depth the management API reports, whose statistics
lag by seconds: a read must take every message, or it reorders the queue."""

MIN_PREFIX = 6
"""The fewest leading characters of a message id that select it."""

SHOWN_HEADER_SKIP = frozenset({"x-delivery-count"})
"""Headers not shown: the quorum queue's count of reads, which every list or show raises."""


class DeadLetterError(FedrelayError):
    """A dead letter cannot be found, shown or replayed as asked; the message says why."""


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead-letter queue: its broker properties, and its envelope header
    where the body decodes as fedrelay's (``problem`` says why not, otherwise)."""

    position: int
    """1 for the head of the queue, as ``dead list`` numbers them."""
    properties: Mapping[str, Any]
    """AMQP properties but the headers."""
    headers: Mapping[str, Any]
    size: int
    """Bytes of the body."""
    envelope: Envelope | None
    problem: str | None
    body: bytes | None = field(default=None, repr=False)
    """The whole body, where it was read whole (to replay it or save its payload)."""

    @classmethod
    def read(
        cls,
        position: int,
        properties: Mapping[str, Any],
        headers: Mapping[str, Any],
        size: int,
        head: bytes,
        *,
        body: bytes | None = None,
    ) -> DeadLetter:
        """A dead letter from its properties and the first bytes of its body."""
        envelope, problem = _envelope(head, complete=len(head) >= size)
        return cls(position, properties, headers, size, envelope, problem, body)

    @property
    def message_id(self) -> str:
        """The envelope's message id (all chunks of a message share it), else the broker's."""
        if self.envelope is not None:
            return self.envelope.message_id
        return str(self.properties.get("message_id") or "")

    @property
    def chunk_index(self) -> int:
        """0-based position of this chunk in its message."""
        return self.envelope.chunk_index if self.envelope is not None else 0

    @property
    def chunk_count(self) -> int:
        """How many chunks its message has (1 if it is whole)."""
        return self.envelope.chunk_count if self.envelope is not None else 1

    @property
    def refused_by_party(self) -> bool:
        """True when a party refused it (it carries fedrelay's reason), False for the broker."""
        return REASON_HEADER in self.headers

    @property
    def reason(self) -> str:
        """Why it was dead-lettered."""
        return dead_letter_reason(self.headers)

    @property
    def refused_by(self) -> str:
        """The party that refused it, or ``broker``."""
        if self.refused_by_party:
            return _text(self.properties.get("user_id")) or "unknown"
        return "broker"

    @property
    def queue(self) -> str | None:
        """The queue it was refused from (or dead-lettered from, by the broker)."""
        return _text(self.headers.get("x-first-death-queue"))

    @property
    def publisher(self) -> str | None:
        """The broker user that published it first: its ``user_id`` before the refusal."""
        if self.refused_by_party:
            return _text(self.headers.get(ORIGINAL_USER_HEADER)) or None
        return _text(self.properties.get("user_id")) or None

    @property
    def time(self) -> datetime.datetime | None:
        """When it was dead-lettered."""
        deaths = self.headers.get("x-death")
        death = deaths[0] if isinstance(deaths, list) and deaths else None
        stamp = self.properties.get("timestamp")
        if not self.refused_by_party and isinstance(death, Mapping):
            stamp = death.get("time", stamp)  # the broker's own dead-lettering
        if isinstance(stamp, datetime.datetime):
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.UTC)
        if isinstance(stamp, int | float) and not isinstance(stamp, bool):
            return datetime.datetime.fromtimestamp(stamp, datetime.UTC)
        return None

    def _claimed(self, envelope_field: str, header: str) -> Any:
        """A field of the envelope or, where it does not decode, what the headers claim."""
        if self.envelope is not None:
            return getattr(self.envelope, envelope_field)
        return self.headers.get(header)

    def summary(self) -> dict[str, Any]:
        """One row of ``dead list``: plain values, no payload."""
        envelope = self.envelope
        kind = str(envelope.kind) if envelope is not None else self.properties.get("type")
        when = self.time
        return {
            "position": self.position,
            "message_id": self.message_id,
            "amqp_message_id": self.properties.get("message_id"),
            "kind": kind,
            "job": self._claimed("job_id", "job"),
            "sender": self._claimed("sender", "sender"),
            "recipient": self._claimed("recipient", "recipient"),
            "round": self._claimed("round", "round"),
            "hop": self._claimed("hop", "hop"),
            "chunk": f"{self.chunk_index + 1}/{self.chunk_count}"
            if envelope is not None
            else _text(self.headers.get("chunk")),
            "size": self.size,
            "payload_size": envelope.payload_size if envelope is not None else None,
            "reason": self.reason,
            "refused_by": self.refused_by,
            "queue": self.queue,
            "published_by": self.publisher,
            "time": when.isoformat() if when is not None else None,
            "problem": self.problem,
        }

    def detail(self) -> dict[str, Any]:
        """What ``dead show`` prints: the whole envelope header and the AMQP properties and
        headers (no payload)."""
        when = self.time
        headers = {k: v for k, v in self.headers.items() if k not in SHOWN_HEADER_SKIP}
        return {
            "position": self.position,
            "message_id": self.message_id,
            "reason": self.reason,
            "refused_by": self.refused_by,
            "queue": self.queue,
            "published_by": self.publisher,
            "time": when.isoformat() if when is not None else None,
            "size": self.size,
            "envelope": to_wire(self.envelope) if self.envelope is not None else None,
            "problem": self.problem,
            "properties": dict(self.properties),
            "headers": headers,
        }


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def _envelope(head: bytes, *, complete: bool) -> tuple[Envelope | None, str | None]:
    """The envelope at the front of a (possibly cut) body, or None and why not."""
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=HEAD_BYTES,
        max_str_len=HEAD_BYTES,
        max_bin_len=HEAD_BYTES,
        max_array_len=4096,
        max_map_len=4096,
        max_ext_len=0,
        strict_map_key=True,
    )
    unpacker.feed(head[:HEAD_BYTES])
    try:
        data = unpacker.unpack()
    except msgpack.OutOfData:
        if complete:
            return None, "the body ends inside the header: not fedrelay's wire format"
        return None, f"the header does not end within its first {HEAD_BYTES} bytes"
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        return None, f"not fedrelay's wire format ({type(e).__name__}: {e})"
    try:
        return parse_envelope(data), None
    except InvalidInput as e:
        return None, str(e)


# -- reading the dead queue ---------------------------------------------------------------------


def peek(api: ManagementApi, vhost: str, topology: Topology) -> list[DeadLetter]:
    """Every dead letter, in queue order, each body cut after :data:`HEAD_BYTES`; through the
    management API, which takes them all and gives them back in order."""
    path = f"queues/{quote(vhost)}/{quote(topology.dead_queue)}"
    state = api.call("GET", path) or {}
    ready = int(state.get("messages_ready") or 0) + int(state.get("messages_unacknowledged") or 0)
    request = {
        "count": ready + PEEK_MARGIN,
        "ackmode": "ack_requeue_true",
        "encoding": "base64",
        "truncate": HEAD_BYTES,
    }
    letters = []
    for position, got in enumerate(api.call("POST", f"{path}/get", request), start=1):
        properties = dict(got.get("properties") or {})  # [] when a message has none
        headers = properties.pop("headers", None) or {}
        head = base64.b64decode(got.get("payload") or "")
        letters.append(
            DeadLetter.read(position, properties, headers, int(got["payload_bytes"]), head)
        )
    return letters


def list_dead(config: FederationConfig, *, user: str, password: str) -> list[DeadLetter]:
    """The federation's dead letters, as the management API user ``user`` sees them."""
    api = ManagementApi(config.broker.management_url, user=user, password=password)
    return peek(api, config.broker.vhost, config.topology())


def connect(config: FederationConfig, *, user: str, password: str) -> AmqpTransport:
    """An AMQP connection as ``user`` (the operator, or the monitoring user), by password.
    Over TLS it presents the federation file's client certificate, but logs in as ``user``:
    the certificate's own name is its party's."""
    settings = config.broker_settings(user, SecretStr(password))
    if settings.tls is not None and settings.tls.external_auth:
        tls = settings.tls.model_copy(update={"external_auth": False})
        settings = settings.model_copy(update={"tls": tls})
    return AmqpTransport(settings)


@dataclass(frozen=True)
class Selector:
    """Which dead letter a command means: a position, as ``dead list`` numbers them (``3`` or
    ``#3``), or a message id, or its first :data:`MIN_PREFIX`+ characters, with ``.<chunk>``
    for one chunk of a chunked message."""

    position: int | None = None
    prefix: str | None = None
    chunk: int | None = None

    @classmethod
    def parse(cls, text: str) -> Selector:
        """The selector ``text`` stands for; DeadLetterError says what is expected."""
        given = text.strip().lower()
        digits = given.removeprefix("#")
        if digits.isdigit() and (given.startswith("#") or len(digits) < MIN_PREFIX):
            if int(digits) < 1:
                raise DeadLetterError(f"position {text!r}: positions start at 1 (`dead list`)")
            return cls(position=int(digits))
        match = re.fullmatch(rf"([0-9a-f]{{{MIN_PREFIX},32}})(?:\.(\d+))?", given)
        if match is None:
            raise DeadLetterError(
                f"{text!r} names no dead letter: give a position from `fedrelay dead list` "
                f"(3 or #3) or a message id (32 hex digits, or its first {MIN_PREFIX} or more, "
                "optionally with .<chunk>)"
            )
        chunk = match[2]
        return cls(prefix=match[1], chunk=None if chunk is None else int(chunk))

    def might_name(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` may belong to the message selected (its body is then kept): by
        position, any chunk might be a chunk of the one at that position."""
        if self.position is not None:
            return letter.position == self.position or letter.chunk_count > 1
        assert self.prefix is not None
        return letter.message_id.startswith(self.prefix)


@dataclass(frozen=True)
class Selection:
    """The dead letters of the message a selector names."""

    named: DeadLetter
    """The one named (by position or chunk), or the message's first chunk."""
    chunks: list[DeadLetter]
    """One dead letter per chunk found, in chunk order (the earliest copy of each)."""
    copies: list[DeadLetter]
    """Further copies of the same chunks, left alone."""
    missing: list[int]
    """Chunks (0-based) of the message that are not in the dead queue."""

    @property
    def description(self) -> str:
        """``model 3f2a… from aggregator to site-1 (job j, round 0, hop 0; 3 chunks)``."""
        letter = self.named
        envelope = letter.envelope
        if envelope is None:
            return f"dead letter #{letter.position} ({letter.properties.get('message_id')})"
        chunks = f"; {envelope.chunk_count} chunks" if envelope.is_chunked else ""
        return (
            f"{envelope.kind} {envelope.message_id} from {envelope.sender} to "
            f"{envelope.recipient} (job {envelope.job_id}, round {envelope.round}, hop "
            f"{envelope.hop}{chunks})"
        )


def select(letters: list[DeadLetter], selector: Selector) -> Selection:
    """The dead letters of the message ``selector`` names; DeadLetterError if none or more
    than one message fits."""
    if selector.position is not None:
        if selector.position > len(letters):
            raise DeadLetterError(
                f"position {selector.position}: the dead-letter queue holds {len(letters)} "
                "message(s); see `fedrelay dead list`"
            )
        named = letters[selector.position - 1]
        if named.envelope is None:
            return Selection(named, [named], [], [])
    else:
        assert selector.prefix is not None
        ids = sorted({x.message_id for x in letters if x.message_id.startswith(selector.prefix)})
        if not ids:
            raise DeadLetterError(
                f"no dead letter has a message id starting {selector.prefix!r}; see "
                "`fedrelay dead list` (it may have been replayed already)"
            )
        if len(ids) > 1:
            raise DeadLetterError(
                f"{selector.prefix!r} starts {len(ids)} message ids ({', '.join(ids[:5])}); "
                "give more of it"
            )
        family = [x for x in letters if x.message_id == ids[0]]
        if selector.chunk is None:
            named = min(family, key=lambda x: x.chunk_index)
        else:
            chunk = [x for x in family if x.chunk_index == selector.chunk]
            if not chunk:
                raise DeadLetterError(
                    f"message {ids[0]} has no chunk {selector.chunk} in the dead-letter queue "
                    f"(chunks there: {sorted({x.chunk_index for x in family})})"
                )
            named = chunk[0]
    first: dict[int, DeadLetter] = {named.chunk_index: named}
    copies = []
    for letter in letters:
        if letter is named or letter.envelope is None or letter.message_id != named.message_id:
            continue
        if letter.chunk_index in first:
            copies.append(letter)
        else:
            first[letter.chunk_index] = letter
    missing = [i for i in range(named.chunk_count) if i not in first]
    return Selection(named, [first[i] for i in sorted(first)], copies, missing)


class _Held:
    """Every dead letter, taken off the queue for the length of a ``with`` block; whatever
    was not acked goes back, in the order taken, when it ends (however it ends)."""

    def __init__(
        self, transport: AmqpTransport, queue: str, keep: Callable[[DeadLetter], bool]
    ) -> None:
        self.transport = transport
        self.queue = queue
        self.keep = keep
        self.letters: list[DeadLetter] = []
        self._deliveries: list[Delivery] = []
        self._acked: set[int] = set()

    def __enter__(self) -> _Held:
        try:
            while (delivery := self.transport.take(self.queue)) is not None:
                message = delivery.message
                properties = {
                    "type": message.type,
                    "message_id": message.message_id,
                    "correlation_id": message.correlation_id,
                    "user_id": message.user_id,
                    "content_type": message.content_type,
                }
                position = len(self.letters) + 1
                size = len(message.body)
                letter = DeadLetter.read(
                    position, properties, dict(message.headers), size, message.body[:HEAD_BYTES]
                )
                if self.keep(letter):
                    letter = replace(letter, body=message.body)
                self.letters.append(letter)
                # Only the tag is needed to settle it: bodies not kept are let go now.
                self._deliveries.append(replace(delivery, message=replace(message, body=b"")))
        except AccessRefused as e:
            self._give_back()
            raise AccessRefused(
                f"{self.transport.user!r} may not read the dead-letter queue {self.queue!r} "
                f"({e}); use the federation's operator user (operator/credentials.toml) or "
                "its monitoring user"
            ) from e
        except BaseException:
            self._give_back()
            raise
        return self

    def ack(self, letters: list[DeadLetter]) -> None:
        """Remove ``letters`` from the queue for good."""
        for letter in letters:
            self.transport.ack(self._deliveries[letter.position - 1])
            self._acked.add(letter.position)

    def _give_back(self) -> None:
        self.transport.give_back(
            [d for i, d in enumerate(self._deliveries, start=1) if i not in self._acked]
        )

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._give_back()

    @property
    def remaining(self) -> int:
        """How many dead letters stay in the queue."""
        return len(self._deliveries) - len(self._acked)


# -- saving a payload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedPayload:
    """A dead letter's payload, written to a file."""

    selection: Selection
    path: Path
    size: int
    digest_matches: bool
    """Whether its sha256 is the one the envelope header carries."""


def save_payload(
    transport: AmqpTransport, topology: Topology, selector: Selector, path: Path
) -> SavedPayload:
    """Write the payload of the message ``selector`` names (every chunk's, in order) to a new
    file ``path`` (mode 0600: it may be weights); the dead letters stay where they are."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise DeadLetterError(f"{path} exists; name a new file for the payload") from e
    except OSError as e:
        raise DeadLetterError(f"cannot create {path} for the payload: {e}") from e
    written = False
    try:
        with (
            os.fdopen(descriptor, "wb") as out,
            _Held(transport, topology.dead_queue, selector.might_name) as held,
        ):
            selection = select(held.letters, selector)
            if selection.named.envelope is None:
                raise DeadLetterError(
                    f"dead letter #{selection.named.position} does not decode as fedrelay's "
                    f"({selection.named.problem}); it has no payload to tell apart"
                )
            if selection.missing:
                raise DeadLetterError(_missing(selection))
            sha = hashlib.sha256()
            size = 0
            for letter in selection.chunks:
                assert letter.body is not None  # kept: it might be named
                try:
                    _, payload = decode_frame(letter.body)
                except InvalidInput as e:
                    raise DeadLetterError(
                        f"dead letter #{letter.position}'s payload cannot be cut from its body: {e}"
                    ) from e
                out.write(payload)
                sha.update(payload)
                size += len(payload)
            last = selection.chunks[-1].envelope
            matches = last is not None and sha.hexdigest() == last.payload_digest
            saved = SavedPayload(selection, path, size, matches)
        written = True
    finally:
        if not written:
            path.unlink(missing_ok=True)
    return saved


def _missing(selection: Selection) -> str:
    named = selection.named
    return (
        f"message {named.message_id} has {len(selection.chunks)} of its {named.chunk_count} "
        f"chunks in the dead-letter queue (missing: {', '.join(map(str, selection.missing))}); "
        "the rest were accepted or lost, and a part of a message is of no use to anyone"
    )


# -- replaying ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """What a replay did, or with ``dry_run`` would have done."""

    selection: Selection
    routing_key: str
    user_id: str
    remaining: int
    """Dead letters left in the queue afterwards."""
    dry_run: bool


def inbox_key(topology: Topology, queue: str | None) -> str | None:
    """The routing key that reaches ``queue``, if it is a site's or the aggregator's inbox."""
    if queue == topology.aggregator_queue:
        return AGGREGATOR
    for site in topology.sites:
        if queue == topology.site_queue(site):
            return site_key(site)
    return None


def _original(letter: DeadLetter, user_id: str) -> Message:
    """The message as first published: same body and properties, without the headers added
    on its way to the dead queue (all ``x-``: fedrelay's reason, the broker's ``x-death``)."""
    assert letter.body is not None
    return Message(
        body=letter.body,
        type=str(letter.properties.get("type") or ""),
        message_id=str(letter.properties.get("message_id") or ""),
        correlation_id=str(letter.properties.get("correlation_id") or ""),
        user_id=user_id,
        headers={k: v for k, v in letter.headers.items() if not k.startswith("x-")},
        content_type=str(letter.properties.get("content_type") or ""),
    )


def _route(selection: Selection, topology: Topology) -> tuple[str, str]:
    """Where and as whom to republish; DeadLetterError when a replay cannot help."""
    named = selection.named
    envelope = named.envelope
    if envelope is None:
        raise DeadLetterError(
            f"dead letter #{named.position} does not decode as fedrelay's ({named.problem}); "
            "replayed, it would only be refused again"
        )
    if selection.missing:
        raise DeadLetterError(_missing(selection))
    publisher = named.publisher
    if publisher is None:
        raise DeadLetterError(
            f"message {named.message_id} was published without a user_id; every receiver "
            "refuses that, so it cannot be replayed"
        )
    if publisher != envelope.sender:
        raise DeadLetterError(
            f"message {named.message_id} was published by broker user {publisher!r} but its "
            f"envelope says sender {envelope.sender!r}: the forgery it was refused for. "
            "Replaying cannot make it genuine"
        )
    key = inbox_key(topology, named.queue)
    if key is None:
        raise DeadLetterError(
            f"message {named.message_id} was refused from queue {named.queue!r}, which is no "
            f"site's or aggregator's inbox in federation {topology.federation!r} (sites: "
            f"{', '.join(topology.sites)}); only those are replayed to"
        )
    if named.refused_by_party and topology.queue_of(named.refused_by) != named.queue:
        # The refusing party's user_id is the broker's word; the headers are the publisher's.
        # A party may dead-letter only from its own inbox: anything else was forged into the
        # dead letters, to have the operator's impersonation deliver it.
        raise DeadLetterError(
            f"message {named.message_id} says it was refused from {named.queue!r} but was "
            f"dead-lettered by {named.refused_by!r}, whose inbox that is not: its headers are "
            "forged, and it is not replayed"
        )
    if named.queue != topology.queue_of(envelope.recipient):
        raise DeadLetterError(
            f"message {named.message_id} is addressed to {envelope.recipient!r} but was refused "
            f"from {named.queue!r}: a misrouted message is refused wherever it is replayed"
        )
    return key, publisher


def replay(
    transport: AmqpTransport, topology: Topology, selector: Selector, *, dry_run: bool = False
) -> Replay:
    """Republish the message ``selector`` names to the inbox it was refused from, as its
    original sender, then remove it from the dead queue; every other dead letter stays, in
    order. With ``dry_run`` nothing changes."""
    with _Held(transport, topology.dead_queue, selector.might_name) as held:
        selection = select(held.letters, selector)
        key, user_id = _route(selection, topology)
        if not dry_run:
            for letter in selection.chunks:
                try:
                    transport.publish(key, _original(letter, user_id), exchange=topology.exchange)
                except AccessRefused as e:
                    operator = operator_user(topology.federation)
                    raise AccessRefused(
                        f"the broker refused {transport.user!r} republishing "
                        f"{letter.message_id} as {user_id!r} with routing key {key!r} ({e}). "
                        "Only a user with the `impersonator` tag may publish under another "
                        "user's user_id, and it needs write on the federation exchange for "
                        f"that key: use the provisioned {operator!r} (its password is in "
                        "operator/credentials.toml), or give this user the impersonator tag. "
                        "The dead letter stays where it was"
                    ) from e
            # Only now, every chunk confirmed by the broker, do the dead letters go.
            held.ack(selection.chunks)
        remaining = held.remaining
    return Replay(selection, key, user_id, remaining, dry_run)
