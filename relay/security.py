"""Party identities, signed envelopes and end-to-end encrypted payloads.

- **Identity**: each party (a site, the aggregator) holds an Ed25519 signing key and an X25519
  encryption key, written with 0600 permissions by ``fedrelay provision``. The **roster**, the
  public keys of every party, goes to everyone.
- **Signatures**: a sender signs every envelope (each chunk's) over its header, which holds
  the payload's sha256 (or, for a chunk, its checksum; the last chunk's signed sha256 covers
  the whole payload) and, signed with it, the federation's name: an envelope cannot be moved
  to another federation. A receiver refuses what is unsigned, signed by a key not in the
  roster for its sender, or altered after signing.
- **Encryption** (optional, per federation, ``encrypt_payloads`` in the roster): ECIES, as in
  RFC 9180's base mode: a fresh X25519 key per transfer, agreed with the recipient's public
  key, HKDF-SHA256 into an AES-256-GCM key bound to federation, job, sender and recipient.
  The payload is sealed in segments (GCM takes at most 2 GiB at once) whose nonces count them
  and flag the last, so segments cannot be reordered, dropped or cut off. The broker and its
  operator see only ciphertext; tampering fails the tag.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import Field

from relay.errors import ConfigError, EnvelopeError, InvalidInput
from relay.jobspec import MAX_PAYLOAD, NAME_PATTERN, Frozen
from relay.validation import parse_json

SIGNING_KEY_FILE = "signing.key"
ENCRYPTION_KEY_FILE = "encryption.key"

SIGNATURE_CONTEXT = b"fedrelay envelope signature v1\x00"
"""Domain separation: these signatures mean nothing to any other protocol."""

SEAL_SCHEME: Literal["x25519-hkdf-sha256-aes256gcm"] = "x25519-hkdf-sha256-aes256gcm"

SEGMENT = 64 * 1024 * 1024
"""Plaintext bytes per GCM segment: far below GCM's and OpenSSL's limits."""

TAG = 16

Key32 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$", description="32-byte key, base64")]


def b64(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode()


def _raw(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class PublicKeys(Frozen):
    """One party's public keys, as the roster lists them."""

    signing: Key32
    encryption: Key32


class Roster(Frozen):
    """The federation's parties and their public keys; every party holds the same roster."""

    federation: str = Field(pattern=NAME_PATTERN)
    encrypt_payloads: bool = False
    parties: dict[Annotated[str, Field(pattern=NAME_PATTERN)], PublicKeys] = Field(min_length=1)

    @classmethod
    def load(cls, path: Path) -> Roster:
        """Read a roster file; ConfigError names what is wrong with it."""
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"roster {path}: cannot be read ({e.strerror})") from e
        try:
            return parse_json(cls, text, what=f"roster {path}")
        except EnvelopeError as e:
            raise ConfigError(str(e)) from e

    def save(self, path: Path) -> None:
        """Write the roster (public: readable by all)."""
        path.write_text(self.model_dump_json(indent=2) + "\n")


class Sealed(Frozen):
    """How an encrypted payload was sealed, carried (and signed) in its envelope."""

    scheme: Literal["x25519-hkdf-sha256-aes256gcm"] = SEAL_SCHEME
    ephemeral_key: Key32
    plaintext_size: int = Field(ge=0, le=MAX_PAYLOAD)
    plaintext_mac: str = Field(pattern=r"^[0-9a-f]{64}$")
    """HMAC-SHA256 of the plaintext under a key only sender and recipient share: a message sent
    again (with fresh ciphertext) is recognised as the same, and the broker learns nothing."""


class Identity:
    """One party's private keys."""

    def __init__(self, name: str, signing: Ed25519PrivateKey, encryption: X25519PrivateKey) -> None:
        self.name = name
        self.signing = signing
        self.encryption = encryption

    @classmethod
    def generate(cls, name: str) -> Identity:
        """Fresh keys."""
        return cls(name, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def public(self) -> PublicKeys:
        """The roster entry of this identity."""
        return PublicKeys(
            signing=b64(_raw(self.signing.public_key())),
            encryption=b64(_raw(self.encryption.public_key())),
        )

    def save(self, folder: Path) -> None:
        """Write both keys as PKCS#8 PEM, readable by the owner only (0600, folder 0700)."""
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        for name, key in ((SIGNING_KEY_FILE, self.signing), (ENCRYPTION_KEY_FILE, self.encryption)):
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_private(folder / name, pem)

    @classmethod
    def load(cls, name: str, folder: Path) -> Identity:
        """Read a party's keys; ConfigError if missing, malformed or readable by others."""
        signing = _load_private(folder / SIGNING_KEY_FILE)
        encryption = _load_private(folder / ENCRYPTION_KEY_FILE)
        if not isinstance(signing, Ed25519PrivateKey):
            raise ConfigError(f"key {folder / SIGNING_KEY_FILE}: not an Ed25519 private key")
        if not isinstance(encryption, X25519PrivateKey):
            raise ConfigError(f"key {folder / ENCRYPTION_KEY_FILE}: not an X25519 private key")
        return cls(name, signing, encryption)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never briefly readable by others)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_private(path: Path) -> object:
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"key {path}: cannot be read ({e.strerror}); it comes from `fedrelay provision`"
        ) from e
    if mode & 0o077:
        raise ConfigError(
            f"key {path}: mode {mode:04o} lets others read this private key; run `chmod 600 {path}`"
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except ValueError as e:
        raise ConfigError(f"key {path}: not a PEM private key ({e})") from e


def signed_bytes(header: dict[str, object], federation: str) -> bytes:
    """What a signature covers: the federation and every header field but the signature."""
    fields = {k: v for k, v in header.items() if k != "signature"}
    body = json.dumps(
        {"federation": federation, "envelope": fields}, sort_keys=True, separators=(",", ":")
    )
    return SIGNATURE_CONTEXT + body.encode()


class Verifier:
    """Checks signatures against a roster; holds no private key (for offline audits too)."""

    def __init__(self, roster: Roster) -> None:
        self.federation = roster.federation
        self._signing = {
            name: Ed25519PublicKey.from_public_bytes(base64.b64decode(keys.signing))
            for name, keys in roster.parties.items()
        }

    def verify(self, header: dict[str, object], sender: str) -> None:
        """Refuse an unsigned or forged header: EnvelopeError saying which."""
        signature = header.get("signature")
        if not isinstance(signature, str):
            raise EnvelopeError(
                f"unsigned: envelope from {sender!r} carries no signature; every envelope of "
                f"federation {self.federation!r} is signed by its sender"
            )
        key = self._signing.get(sender)
        if key is None:
            raise EnvelopeError(
                f"forged: sender {sender!r} is not in the roster of {self.federation!r}"
            )
        try:
            key.verify(
                base64.b64decode(signature, validate=True), signed_bytes(header, self.federation)
            )
        except (InvalidSignature, ValueError) as e:
            raise EnvelopeError(
                f"forged or tampered: the signature does not match {sender!r}'s key over this "
                "envelope; it was altered after signing or signed by someone else"
            ) from e


class Security:
    """What one party needs to sign, verify, seal and open: its identity and the roster."""

    def __init__(self, identity: Identity, roster: Roster) -> None:
        listed = roster.parties.get(identity.name)
        if listed is None:
            raise ConfigError(
                f"roster of {roster.federation!r} does not list {identity.name!r}; "
                "give this party the roster provisioned with its keys"
            )
        if listed != identity.public():
            raise ConfigError(
                f"roster of {roster.federation!r}: {identity.name!r}'s public keys do not match "
                "its private keys; the keys and the roster come from different provisionings"
            )
        self.identity = identity
        self.roster = roster
        self.verifier = Verifier(roster)
        self._encryption = {
            name: X25519PublicKey.from_public_bytes(base64.b64decode(keys.encryption))
            for name, keys in roster.parties.items()
        }

    @property
    def federation(self) -> str:
        """The federation the roster belongs to."""
        return self.roster.federation

    def signature(self, header: dict[str, object]) -> str:
        """This party's signature over an envelope header."""
        return b64(self.identity.signing.sign(signed_bytes(header, self.federation)))

    def verify(self, header: dict[str, object], sender: str) -> None:
        """Refuse an unsigned or forged header: EnvelopeError saying which."""
        self.verifier.verify(header, sender)

    def should_seal(self, recipient: str) -> bool:
        """True if payloads to ``recipient`` are encrypted (a party in an encrypting roster)."""
        return self.roster.encrypt_payloads and recipient in self.roster.parties

    def seal(
        self, plaintext: bytes | bytearray | memoryview, *, recipient: str, job_id: str
    ) -> tuple[bytearray, Sealed]:
        """Encrypt a payload for ``recipient``; return the ciphertext and its header."""
        if recipient not in self.roster.parties:
            raise ConfigError(f"cannot encrypt for {recipient!r}: not in the roster")
        view = memoryview(plaintext).cast("B")
        ephemeral = X25519PrivateKey.generate()
        sealed = Sealed(
            ephemeral_key=b64(_raw(ephemeral.public_key())),
            plaintext_size=len(view),
            plaintext_mac=self._mac(view, sender=self.identity.name, recipient=recipient),
        )
        shared = ephemeral.exchange(self._encryption[recipient])
        aes = self._cipher(shared, sealed, self.identity.name, recipient, job_id)
        # Into one buffer, segment by segment: a fresh object per segment costs more than
        # the cipher.
        out = bytearray(_sealed_size(len(view)))
        target = memoryview(out)
        for index, start, last in _segments(len(view)):
            part = view[start : start + SEGMENT]
            at = start + index * TAG
            aes.encrypt_into(_nonce(index, last), part, None, target[at : at + len(part) + TAG])
        return out, sealed

    def open(
        self,
        ciphertext: bytes | memoryview | mmap.mmap,
        sealed: Sealed,
        *,
        sender: str,
        job_id: str,
    ) -> bytearray:
        """Decrypt a payload sealed for this party; InvalidInput if it was tampered with."""
        view = memoryview(ciphertext).cast("B")
        expected = _sealed_size(sealed.plaintext_size)
        if len(view) != expected:
            raise InvalidInput(
                f"sealed payload: {len(view)} bytes, expected {expected} for "
                f"{sealed.plaintext_size} plaintext bytes; it was cut or padded"
            )
        try:
            peer = X25519PublicKey.from_public_bytes(base64.b64decode(sealed.ephemeral_key))
            shared = self.identity.encryption.exchange(peer)
        except ValueError as e:  # a low-order or malformed point
            raise InvalidInput(f"sealed.ephemeral_key from {sender!r}: unusable ({e})") from e
        aes = self._cipher(shared, sealed, sender, self.identity.name, job_id)
        out = bytearray(sealed.plaintext_size)
        target = memoryview(out)
        try:
            for index, start, last in _segments(sealed.plaintext_size):
                size = min(SEGMENT, sealed.plaintext_size - start)
                at = start + index * TAG
                segment = view[at : at + size + TAG]
                aes.decrypt_into(_nonce(index, last), segment, None, target[start : start + size])
        except InvalidTag as e:
            raise InvalidInput(
                f"sealed payload from {sender!r}: authentication failed; it was tampered with "
                f"or not encrypted for {self.identity.name!r}"
            ) from e
        if self._mac(out, sender=sender, recipient=self.identity.name) != sealed.plaintext_mac:
            raise InvalidInput(f"sealed.plaintext_mac from {sender!r} does not match the payload")
        return out

    def _mac(
        self, plaintext: bytes | bytearray | memoryview, *, sender: str, recipient: str
    ) -> str:
        peer = recipient if sender == self.identity.name else sender
        shared = self.identity.encryption.exchange(self._encryption[peer])
        key = _derive(shared, "fedrelay plaintext mac v1", self.federation, sender, recipient)
        mac = hmac.HMAC(key, hashes.SHA256())
        mac.update(plaintext)
        return mac.finalize().hex()

    def _cipher(
        self, shared: bytes, sealed: Sealed, sender: str, recipient: str, job_id: str
    ) -> AESGCM:
        parts = (SEAL_SCHEME, self.federation, job_id, sender, recipient, sealed.ephemeral_key)
        return AESGCM(_derive(shared, *parts))


def _derive(shared: bytes, *info: str) -> bytes:
    """A 256-bit key from an X25519 secret, bound to ``info`` (HKDF-SHA256)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info="|".join(info).encode()
    ).derive(shared)


def _sealed_size(plaintext: int) -> int:
    """Ciphertext bytes for ``plaintext`` bytes: one tag per segment."""
    return plaintext + TAG * max(1, -(-plaintext // SEGMENT))


def _segments(size: int) -> Iterator[tuple[int, int, bool]]:
    """(index, start, is_last) of each segment of ``size`` bytes; an empty payload has one."""
    count = max(1, -(-size // SEGMENT))
    for index in range(count):
        yield index, index * SEGMENT, index == count - 1


def _nonce(index: int, last: bool) -> bytes:
    # The key is fresh per transfer, so a counter is a unique nonce; the flag stops truncation.
    return struct.pack(">IQ", 1 if last else 0, index)


def generate(
    federation: str, parties: list[str], *, encrypt_payloads: bool
) -> tuple[Roster, dict[str, Identity]]:
    """Fresh identities for ``parties`` and the roster of their public keys."""
    identities = {name: Identity.generate(name) for name in parties}
    roster = Roster(
        federation=federation,
        encrypt_payloads=encrypt_payloads,
        parties={name: identity.public() for name, identity in identities.items()},
    )
    return roster, identities
