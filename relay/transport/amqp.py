"""The AMQP transport: RabbitMQ through pika, with the same semantics as the memory transport.

- Publishes are persistent, mandatory and confirmed; pika's errors become fedrelay's own
  (Unroutable, AccessRefused, MessageTooLarge, TransportError) at this edge, cause kept.
- ``prefetch_count=1``. A queue's consumer streams deliveries (chunks arrive as fast as raw
  pika's) until the caller, about to train, calls :meth:`hold`: that cancels it before the
  ack, so nothing else is delivered (and left unacked past RabbitMQ's ``consumer_timeout``)
  while the node trains.
- A background thread services the connection while the caller trains, so heartbeats never
  lapse. pika's BlockingConnection is not thread safe: every use of it holds one lock.
- Connection loss is survived: the connection is rebuilt with bounded, growing back-off
  ("attempt n/N" in the log) and the operation retried. Given several broker addresses (the
  nodes of a cluster), each attempt goes round them, starting after the one that failed
  last. Deliveries taken on a lost connection cannot be acked any more; the broker
  redelivers them and receivers, being idempotent, drop the copies.
- RabbitMQ's ``basic.reject`` cannot add headers, so :meth:`reject` republishes the message
  to the dead-letter exchange with the reason in ``x-fedrelay-reason``, then acks it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pika
import pika.exceptions as pe
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from relay.errors import (
    AccessRefused,
    ConfigError,
    MessageTooLarge,
    TransportError,
    Unroutable,
)
from relay.topology import ORIGINAL_USER_HEADER, REASON_HEADER, Topology
from relay.transport import Delivery, Message, Transport

log = logging.getLogger(__name__)

T = TypeVar("T")


class TlsSettings(BaseModel):
    """TLS to the broker: the CA that signed the broker's certificate, and this party's client
    certificate. With ``external_auth`` the broker takes the user name from the certificate's
    common name (RabbitMQ's EXTERNAL mechanism, plugin ``rabbitmq_auth_mechanism_ssl``) and no
    password is sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca: Path
    cert: Path
    key: Path
    server_hostname: str | None = None
    external_auth: bool = True

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker and presents this party's certificate;
        ConfigError names a file that is missing, unreadable, wrong or readable by others."""
        try:
            mode = self.key.stat().st_mode & 0o777
            context = ssl.create_default_context(cafile=str(self.ca))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"broker.tls: cannot use ca {self.ca}, cert {self.cert}, key {self.key} "
                f"({e}); they come from `fedrelay provision --tls`"
            ) from e
        if mode & 0o077:
            raise ConfigError(
                f"broker.tls.key {self.key}: mode {mode:04o} lets others read this private key; "
                f"run `chmod 600 {self.key}`"
            )
        return context


DEFAULT_PORT = 5672

ADDRESS_FORM = (
    '"host" or "host:port" (port 1-65535), e.g. "mq2.example.org:5671"; an IPv6 address as '
    '"[fd00::2]:5671"'
)


def split_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``(host, port)`` of ``"host"``, ``"host:port"``, ``"[v6]"`` or ``"[v6]:port"``;
    ValueError, naming the address and the expected form, for anything else."""
    bad = ValueError(f"{address!r} is not a broker address; write {ADDRESS_FORM}")
    text = address.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise bad
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise bad  # a bare IPv6 address: its last group would read as a port
    else:
        host, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
    if not host or any(c.isspace() or c in "/@?#[]" for c in host):
        raise bad  # a URL ("amqp://…"), credentials or a path are not an address
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise bad
    return host, int(port_text)


def _checked_address(address: str) -> str:
    split_address(address)
    return address.strip()


BrokerAddress = Annotated[str, AfterValidator(_checked_address)]
"""One broker node: ``"host"`` (at the settings' ``port``) or ``"host:port"``."""


class BrokerSettings(BaseModel):
    """Where and how to reach RabbitMQ, as one party. ``host:port`` is the first node to try;
    ``addresses`` are more nodes of the same cluster, tried in turn when one cannot be reached
    (a bare host there means ``port``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    addresses: tuple[BrokerAddress, ...] = ()
    vhost: str = "/"
    username: str = "guest"
    password: SecretStr = SecretStr("guest")
    heartbeat_s: int = Field(default=60, ge=1, le=3600)
    reconnect_attempts: int = Field(default=8, ge=1, le=1000)
    reconnect_delay_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_delay_s: float = Field(default=15.0, gt=0, le=600)
    tls: TlsSettings | None = None

    def endpoints(self) -> list[tuple[str, int]]:
        """Every broker node to try, in order: ``host:port``, then ``addresses`` (each once)."""
        found = [(self.host, self.port)]
        for address in self.addresses:
            endpoint = split_address(address, self.port)
            if endpoint not in found:
                found.append(endpoint)
        return found

    def parameters(self, endpoint: tuple[str, int] | None = None) -> pika.ConnectionParameters:
        """pika's connection parameters for ``endpoint`` (default: ``host:port``)."""
        host, port = endpoint or (self.host, self.port)
        credentials: pika.credentials.PlainCredentials | pika.credentials.ExternalCredentials
        if self.tls is not None and self.tls.external_auth:
            credentials = pika.credentials.ExternalCredentials()
        else:
            credentials = pika.PlainCredentials(self.username, self.password.get_secret_value())
        ssl_options = None
        if self.tls is not None:
            # The certificate is checked against the node dialled, unless a name is pinned.
            ssl_options = pika.SSLOptions(self.tls.context(), self.tls.server_hostname or host)
        return pika.ConnectionParameters(
            host=host,
            port=port,
            virtual_host=self.vhost,
            credentials=credentials,
            ssl_options=ssl_options,
            heartbeat=self.heartbeat_s,
            blocked_connection_timeout=300,
            connection_attempts=1,
        )


STREAM_PREFETCH = 500
"""Stream messages in flight to a reader: streams need a prefetch, and events are small."""


def _message(props: Any, body: bytes) -> Message:
    return Message(
        body=body,
        type=props.type or "",
        message_id=props.message_id or "",
        correlation_id=props.correlation_id or "",
        user_id=props.user_id,
        headers=dict(props.headers or {}),
        content_type=props.content_type or "",
    )


def _refusal(error: pe.ChannelClosed, what: str) -> TransportError:
    text = f"{what}: broker closed the channel ({error.reply_code} {error.reply_text})"
    # RabbitMQ says both with 406 PRECONDITION_FAILED; only the text tells them apart.
    if "user_id property set to" in error.reply_text or error.reply_code == 403:
        return AccessRefused(text)
    if "larger than configured max size" in error.reply_text:
        return MessageTooLarge(text + "; lower the job's chunk_size")
    return TransportError(text)


class AmqpTransport(Transport):
    """One connection to RabbitMQ as ``settings.username``."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.user = settings.username
        self._lock = threading.RLock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._generation = 0
        self._consumers: dict[str, str] = {}
        self._ready: dict[str, collections.deque[Delivery]] = collections.defaultdict(
            collections.deque
        )
        self._unacked: dict[int, int] = {}
        self._closed = False
        self._endpoints = settings.endpoints()
        self._next_endpoint = 0
        self._connected_once = False
        self.endpoint = self._endpoints[0]
        """``(host, port)`` of the broker node of the current (or last) connection."""
        self._connect()
        self._pump = threading.Thread(
            target=self._service, name=f"fedrelay-heartbeat-{self.user}", daemon=True
        )
        self._pump.start()

    # -- connection ------------------------------------------------------------------------

    def _connect(self) -> None:
        """Connect to one of the broker's nodes. Each attempt goes round every address once,
        starting after the one that failed (or was connected to) last, so a node that is down
        is skipped at once; the back-off grows between attempts, not between addresses."""
        attempts = self.settings.reconnect_attempts
        delay = self.settings.reconnect_delay_s
        count = len(self._endpoints)
        last: tuple[str, pe.AMQPConnectionError] | None = None
        for attempt in range(1, attempts + 1):
            for _ in range(count):
                index = self._next_endpoint
                self._next_endpoint = (index + 1) % count
                host, port = self._endpoints[index]
                try:
                    self._connection = pika.BlockingConnection(
                        self.settings.parameters((host, port))
                    )
                    try:
                        self._open_channel()
                    except pe.AMQPError:
                        with contextlib.suppress(pe.AMQPError):  # its socket, not left open
                            self._connection.close()
                        raise
                    if self._connected_once or last is not None:
                        log.warning(
                            "%s connected to RabbitMQ at %s:%d (attempt %d/%d)",
                            self.user,
                            host,
                            port,
                            attempt,
                            attempts,
                        )
                    self.endpoint = (host, port)
                    self._connected_once = True
                    return
                except (
                    pe.ProbableAuthenticationError,
                    pe.AuthenticationError,
                    pe.ProbableAccessDeniedError,
                ) as e:
                    raise AccessRefused(
                        f"RabbitMQ at {host}:{port} refused user {self.user!r} on vhost "
                        f"{self.settings.vhost!r} ({type(e).__name__}); check the credentials "
                        "and the vhost permissions"
                    ) from e
                except ssl.SSLCertVerificationError as e:
                    # Retrying will not make the certificate trusted: say so at once.
                    raise TransportError(
                        f"the broker at {host}:{port} presented a certificate this party does "
                        f"not trust ({e.verify_message}); check broker.tls.ca and that {host!r} "
                        "(or broker.tls.server_hostname) is a name in it"
                    ) from e
                except pe.AMQPConnectionError as e:
                    last = (f"{host}:{port}", e)
                    log.warning(
                        "%s: RabbitMQ at %s:%d unreachable, attempt %d/%d failed (%s)",
                        self.user,
                        host,
                        port,
                        attempt,
                        attempts,
                        type(e).__name__,
                    )
            if attempt == attempts:
                assert last is not None
                where, error = last
                tried = ", ".join(f"{h}:{p}" for h, p in self._endpoints)
                raise TransportError(
                    f"cannot reach RabbitMQ at {tried} after {attempts} attempts (last: "
                    f"{where} {type(error).__name__}: {error}); check broker.host, broker.port "
                    "and broker.addresses, and that the broker runs"
                ) from error
            log.warning("%s: retrying RabbitMQ in %.1f s", self.user, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max_delay_s)

    def _open_channel(self) -> None:
        assert self._connection is not None
        channel = self._connection.channel()
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=1)
        self._channel = channel
        self._consumers.clear()
        self._ready.clear()
        # Delivery tags are per channel: those of the old one must never be settled here.
        self._unacked.clear()
        self._generation += 1

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._consumers.clear()
        self._ready.clear()
        if connection is not None and connection.is_open:
            with contextlib.suppress(pe.AMQPError):  # it is being thrown away either way
                connection.close()

    def _live_channel(self) -> BlockingChannel:
        if self._closed:
            raise TransportError(f"connection of {self.user!r} is closed")
        if self._connection is None or not self._connection.is_open:
            self._drop()
            self._connect()
        elif self._channel is None or not self._channel.is_open:
            self._open_channel()
        assert self._channel is not None
        return self._channel

    def _run(self, what: str, operation: Callable[[BlockingChannel], T]) -> T:
        """Run one pika operation; rebuild a lost connection and retry, a bounded number of
        times; turn pika's errors into fedrelay's."""
        attempts = self.settings.reconnect_attempts
        with self._lock:
            for attempt in range(1, attempts + 1):
                channel = self._live_channel()
                try:
                    return operation(channel)
                except pe.ChannelClosed as e:
                    self._channel = None
                    raise _refusal(e, what) from e
                except (pe.AMQPConnectionError, pe.ChannelWrongStateError) as e:
                    log.warning(
                        "%s: connection lost during %s, attempt %d/%d (%s)",
                        self.user,
                        what,
                        attempt,
                        attempts,
                        type(e).__name__,
                    )
                    self._drop()
                    if attempt == attempts:
                        raise TransportError(f"{what}: connection lost ({e})") from e
        raise AssertionError("unreachable")

    def _service(self) -> None:
        """Keep heartbeats flowing while the caller is busy (training, decoding)."""
        interval = max(0.2, self.settings.heartbeat_s / 4)
        while not self._closed:
            time.sleep(interval)
            if not self._lock.acquire(blocking=False):
                continue  # the caller is using the connection, which services it too
            try:
                if self._connection is not None and self._connection.is_open:
                    self._connection.process_data_events(time_limit=0)
            except Exception as e:  # this thread must outlive any one failure
                log.warning(
                    "%s: connection lost while idle (%s); reconnecting on next use",
                    self.user,
                    type(e).__name__,
                )
                self._drop()
            finally:
                self._lock.release()

    # -- the interface ---------------------------------------------------------------------

    def declare(self, topology: Topology) -> None:
        """Declare exchanges, quorum queues (with delivery limit and dead-lettering), bindings."""

        def declare(channel: BlockingChannel) -> None:
            for exchange in (topology.exchange, topology.dead_letter_exchange):
                channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            for queue in topology.queues():
                channel.queue_declare(
                    queue, durable=True, arguments=topology.queue_arguments(queue)
                )
            for queue, key in topology.bindings():
                channel.queue_bind(queue, topology.exchange, routing_key=key)
            channel.queue_bind(topology.dead_queue, topology.dead_letter_exchange, routing_key="#")

        self._run(f"declare federation {topology.federation!r}", declare)

    def publish(self, routing_key: str, message: Message, *, exchange: str) -> None:
        """Persistent, mandatory, confirmed publish."""
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type=message.content_type,
            type=message.type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            user_id=message.user_id,
            headers=dict(message.headers),
            timestamp=int(time.time()),
            expiration=None if message.expiration_ms is None else str(message.expiration_ms),
        )

        def publish(channel: BlockingChannel) -> None:
            try:
                channel.basic_publish(
                    exchange, routing_key, message.body, properties, mandatory=True
                )
            except pe.UnroutableError as e:
                raise Unroutable(
                    f"no queue is bound to routing key {routing_key!r} on {exchange!r}; "
                    "is the recipient part of the federation?"
                ) from e

        # A nack says a queue could not take the message: in a cluster, one whose leader is
        # being elected after its node went down. Publishing again is RabbitMQ's advice; a
        # copy that some queue did take is dropped by its receiver as a duplicate. Again on a
        # new channel: on RabbitMQ 3.10.8 a channel whose first publish to a quorum queue
        # came while the queue's leader was on a lost node nacks every later publish to it
        # (tried: 40 in 20 s), while a new channel is accepted at once.
        attempts = self.settings.reconnect_attempts
        delay = self.settings.reconnect_delay_s
        for attempt in range(1, attempts + 1):
            try:
                self._run(f"publish {message.message_id} to {routing_key!r}", publish)
                return
            except pe.NackError as e:
                if attempt == attempts:
                    raise TransportError(
                        f"the broker refused message {message.message_id} to {routing_key!r} "
                        f"{attempts} times; check the queues bound to it (rabbitmqctl "
                        "list_queues name type online)"
                    ) from e
                log.warning(
                    "%s: the broker refused message %s to %r, attempt %d/%d; retrying in %.1f s",
                    self.user,
                    message.message_id,
                    routing_key,
                    attempt,
                    attempts,
                    delay,
                )
                with self._lock:
                    channel, self._channel = self._channel, None
                    if channel is not None and channel.is_open:
                        with contextlib.suppress(pe.AMQPError):  # replaced either way
                            channel.close()
            time.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max_delay_s)

    def get(self, queue: str, timeout: float = 0.0) -> Delivery | None:
        """The next delivery from ``queue`` within ``timeout`` seconds, or None."""
        deadline = time.monotonic() + timeout

        def take(channel: BlockingChannel) -> Delivery | None:
            if queue not in self._consumers:
                self._consumers[queue] = channel.basic_consume(
                    queue, lambda ch, method, props, body: self._arrived(queue, method, props, body)
                )
            assert self._connection is not None
            while not self._ready[queue]:
                left = deadline - time.monotonic()
                self._connection.process_data_events(time_limit=max(0.0, min(left, 1.0)))
                if left <= 0:
                    break
            if not self._ready[queue]:
                return None
            return self._ready[queue].popleft()

        return self._run(f"get from {queue!r}", take)

    def hold(self, queue: str) -> None:
        """Cancel ``queue``'s consumer: with prefetch 1 and the caller's delivery still unacked,
        nothing else is in flight to us, so nothing waits unacked while the caller works."""
        with self._lock:
            tag = self._consumers.pop(queue, None)
            if tag is None or self._channel is None or not self._channel.is_open:
                return
            try:
                self._channel.basic_cancel(tag)
            except (pe.AMQPConnectionError, pe.ChannelWrongStateError, pe.ChannelClosed):
                self._drop()  # the deliveries went back to the queue with the connection

    def queue_state(self, queue: str) -> tuple[int, int] | None:
        """``queue``'s ready messages and consumers, or None if there is no such queue. A
        passive declare: RabbitMQ answers it without any right on the queue."""

        def inspect(channel: BlockingChannel) -> tuple[int, int] | None:
            try:
                ok = channel.queue_declare(queue, passive=True)
            except pe.ChannelClosed as e:
                if e.reply_code != 404:
                    raise
                self._channel = None  # a NOT_FOUND closes the channel; the next use reopens it
                return None
            return int(ok.method.message_count), int(ok.method.consumer_count)

        return self._run(f"inspect queue {queue!r}", inspect)

    def check_read(self, queue: str) -> None:
        """Prove the right to read ``queue`` without taking a message: a consumer is attached
        and cancelled at once, on a channel of its own. AccessRefused if the broker refuses.

        Safe when ``queue`` holds no ready messages, or has a consumer already (a
        single-active-consumer queue gives a standby consumer nothing); otherwise the consumer
        could be handed a message, which returns to the queue, counted as a delivery."""

        def attach(channel: BlockingChannel) -> None:
            assert self._connection is not None
            probe = self._connection.channel()
            try:
                probe.basic_qos(prefetch_count=1)
                probe.basic_cancel(probe.basic_consume(queue, lambda *_: None))
            except pe.ChannelClosed as e:
                raise _refusal(e, f"read {queue!r}") from e
            finally:
                if probe.is_open:
                    with contextlib.suppress(pe.AMQPError):  # closing returns what it held
                        probe.close()

        self._run(f"check the right to read {queue!r}", attach)

    def _arrived(self, queue: str, method: Any, props: Any, body: bytes) -> None:
        message = _message(props, body)
        self._unacked[method.delivery_tag] = self._generation
        self._ready[queue].append(
            Delivery(message, queue, method.delivery_tag, bool(method.redelivered))
        )

    def _settle(
        self, delivery: Delivery, what: str, act: Callable[[BlockingChannel], None]
    ) -> None:
        with self._lock:
            generation = self._unacked.pop(delivery.tag, None)
            channel = self._channel
            if generation == self._generation and channel is not None and channel.is_open:
                try:
                    act(channel)
                    return
                except pe.ChannelClosed as e:
                    self._channel = None
                    raise _refusal(e, f"{what} delivery {delivery.tag}") from e
                except (pe.AMQPConnectionError, pe.ChannelWrongStateError):
                    self._drop()
        # Taken on a connection since lost: the broker requeues it by itself, and the receiver
        # drops the redelivered copy as a duplicate. Never retried on a new connection, where
        # the tag would name another message or none.
        log.warning(
            "%s: cannot %s delivery %d, its connection is gone; the broker will redeliver it",
            self.user,
            what,
            delivery.tag,
        )

    def ack(self, delivery: Delivery) -> None:
        """Forget the message."""
        self._settle(delivery, "ack", lambda ch: ch.basic_ack(delivery.tag))

    def reject(self, delivery: Delivery, reason: str, *, dead_letter_exchange: str) -> None:
        """Republish to the dead-letter exchange with the reason, confirmed, then ack."""
        headers = dict(delivery.message.headers)
        headers[REASON_HEADER] = reason[:4000]
        headers["x-first-death-queue"] = delivery.queue
        headers[ORIGINAL_USER_HEADER] = delivery.message.user_id or ""
        copy = Message(
            body=delivery.message.body,
            type=delivery.message.type,
            message_id=delivery.message.message_id,
            correlation_id=delivery.message.correlation_id,
            user_id=self.user,
            headers=headers,
            content_type=delivery.message.content_type,
        )
        with self._lock:
            self.publish(delivery.queue, copy, exchange=dead_letter_exchange)
            self.ack(delivery)

    def read_stream(
        self,
        queue: str,
        on_message: Callable[[Message, int], bool],
        *,
        offset: str | int = "first",
        idle_s: float | None = None,
    ) -> str | int:
        """Read the stream ``queue`` from ``offset`` ("first", "last", "next" or a number),
        calling ``on_message(message, its offset)``; nothing is consumed.

        Returns when ``on_message`` returns True, or, with ``idle_s``, once no message came for
        that long (a stream has no end: idleness is how a snapshot knows it caught up); returns
        the offset to go on reading from. A lost connection is rebuilt and reading goes on
        after the last offset seen.
        """
        position: list[str | int] = [offset]
        done = [False]

        def read(channel: BlockingChannel) -> None:
            assert self._connection is not None
            stream = self._connection.channel()  # its own prefetch; acks only move credit
            stream.basic_qos(prefetch_count=STREAM_PREFETCH)
            arrived: collections.deque[tuple[Message, int, int]] = collections.deque()

            def take(_ch: Any, method: Any, props: Any, body: bytes) -> None:
                at = (props.headers or {}).get("x-stream-offset", 0)
                arrived.append((_message(props, body), int(at), method.delivery_tag))

            stream.basic_consume(queue, take, arguments={"x-stream-offset": position[0]})
            last = time.monotonic()
            try:
                while not done[0]:
                    self._connection.process_data_events(time_limit=0.2)
                    if arrived:
                        last = time.monotonic()
                    while arrived and not done[0]:
                        message, at, tag = arrived.popleft()
                        position[0] = at + 1
                        stream.basic_ack(tag)
                        done[0] = on_message(message, at)
                    if idle_s is not None and time.monotonic() - last >= idle_s:
                        done[0] = True
            finally:
                if stream.is_open:
                    with contextlib.suppress(pe.AMQPError):
                        stream.close()

        self._run(f"read stream {queue!r}", read)
        return position[0]

    def requeue(self, delivery: Delivery) -> None:
        """Give the message back; the quorum queue counts it against the delivery limit."""
        self._settle(delivery, "requeue", lambda ch: ch.basic_nack(delivery.tag, requeue=True))

    def take(self, queue: str) -> Delivery | None:
        """The message at the head of ``queue`` by ``basic.get``, left unacked; None when the
        queue holds nothing ready. Unlike :meth:`get` it attaches no consumer, so no prefetch
        limit applies: a caller may hold every message of a queue at once (an operator going
        through the dead letters), then settle each with :meth:`ack` or :meth:`give_back`.

        Never retried on a new connection: what was held on the lost one went back to the
        queue, and taking on would meet it twice. TransportError says so instead.
        """
        with self._lock:
            held = bool(self._unacked)
            generation = self._generation
            channel = self._live_channel()
            if held and self._generation != generation:
                raise TransportError(
                    f"take from {queue!r}: the connection was lost while messages taken from "
                    "it were held; they went back to the queue unchanged. Try again"
                )
            try:
                method, props, body = channel.basic_get(queue, auto_ack=False)
            except pe.ChannelClosed as e:
                self._channel = None
                raise _refusal(e, f"take from {queue!r}") from e
            except (pe.AMQPConnectionError, pe.ChannelWrongStateError) as e:
                self._drop()
                raise TransportError(
                    f"take from {queue!r}: connection lost ({type(e).__name__}); what was "
                    "taken went back to the queue unchanged. Try again"
                ) from e
            if method is None:
                return None
            self._unacked[method.delivery_tag] = self._generation
            message = _message(props, body or b"")
            return Delivery(message, queue, method.delivery_tag, bool(method.redelivered))

    def give_back(self, deliveries: list[Delivery]) -> None:
        """Requeue ``deliveries`` in the order given. A quorum queue appends what it gets back
        at its tail, so giving back every message taken, in the order taken, keeps the queue's
        order. Deliveries of a connection since lost are back in their queue already."""
        with self._lock:
            for delivery in deliveries:
                generation = self._unacked.pop(delivery.tag, None)
                channel = self._channel
                if generation != self._generation or channel is None or not channel.is_open:
                    continue
                try:
                    channel.basic_nack(delivery.tag, requeue=True)
                except pe.ChannelClosed as e:
                    self._channel = None
                    raise _refusal(e, f"requeue delivery {delivery.tag}") from e
                except (pe.AMQPConnectionError, pe.ChannelWrongStateError):
                    self._drop()  # the broker requeues whatever the connection held

    def close(self) -> None:
        """Close the connection; unacked deliveries return to their queues."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop()
