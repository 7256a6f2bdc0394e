"""Ed25519 identities: key files, node ids, signing and verification.

A daemon's key is created on first start and stored raw (32 bytes, hex-encoded) with 0600
permissions; it is reused after a restart and refused if the file is readable by group or
others. A node id is the first 128 bits of SHA-256 over the raw public key, in hex, so an
id can only be claimed by whoever holds the matching private key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pipeguard.errors import InvalidArgument, PipeguardError

log = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NODE_ID_HEX = 32


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` atomically to ``path`` with mode 0600 (parent created 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class KeyFileError(PipeguardError):
    """A key file that is unsafe or unreadable."""


def node_id_for(public_key: bytes) -> str:
    """The node id derived from a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise InvalidArgument(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()[:NODE_ID_HEX]


@dataclass(frozen=True)
class PublicIdentity:
    """Someone else's key: verify only."""

    public_key: bytes

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this key's signature over ``message``."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Identity:
    """A daemon's own key pair."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.node_id = node_id_for(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def public(self) -> PublicIdentity:
        return PublicIdentity(self.public_key)

    def private_bytes_hex(self) -> str:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        raw = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return raw.hex()

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """Load the key at ``path``, creating it (0600, parent 0700) if it does not exist."""
        path = Path(path).expanduser()
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        write_private_file(path, ident.private_bytes_hex() + "\n")
        log.info("created new identity %s at %s", ident.node_id, path)
        return ident

    @classmethod
    def load(cls, path: Path) -> "Identity":
        path = Path(path).expanduser()
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
                f"run `chmod 600 {path}`"
            )
        text = path.read_text().strip()
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise KeyFileError(f"key file {path} is not hex-encoded") from None
        if len(raw) != 32:
            raise KeyFileError(f"key file {path} must hold a 32-byte Ed25519 seed, found {len(raw)} bytes")
        ident = cls(Ed25519PrivateKey.from_private_bytes(raw))
        log.info("loaded identity %s from %s", ident.node_id, path)
        return ident
