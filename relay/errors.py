"""The project's error types. Every error names what was wrong and what to do about it."""

from __future__ import annotations


class FedrelayError(Exception):
    """Base of every error fedrelay raises on purpose."""


class InvalidInput(FedrelayError):
    """Something that arrived (an envelope, a payload, a chunk) is not acceptable.

    A node dead-letters the message that caused it, with ``str(error)`` as the reason,
    and keeps working.
    """


class EnvelopeError(InvalidInput):
    """An envelope or job spec failed validation; the message names field, value and expectation."""


class CodecError(InvalidInput):
    """A tensor payload cannot be encoded or decoded."""


class ChunkError(InvalidInput):
    """Chunks of one payload are missing, duplicated with other bytes, inconsistent or corrupt."""


class ConfigError(FedrelayError):
    """A setting given at start-up is wrong; raised before any work starts."""


class TransportError(FedrelayError):
    """The transport could not carry out a publish, get, ack or declare."""


class Unroutable(TransportError):
    """A mandatory publish matched no queue: the recipient does not exist in the topology."""


class AccessRefused(TransportError):
    """The broker refused an operation: wrong ``user_id``, or a permission the user lacks."""


class MessageTooLarge(TransportError):
    """A message exceeded the broker's ``max_message_size``; chunk it smaller."""


class JobFailed(FedrelayError):
    """A federated job cannot complete; the message says which round or hop and why."""
