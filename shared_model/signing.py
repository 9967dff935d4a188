"""Ed25519 keys (``cryptography``): create, load and export; the one place keys are handled.

A private key is a PEM PKCS#8 file created 0600 (``O_EXCL``: an existing key is reused,
never overwritten); its public key is a PEM SubjectPublicKeyInfo file. Used by the server
to sign checkpoint manifests (:mod:`shared_model.checkpoint_signature`) and by each silo to
sign its ledger records (:mod:`shared_model.privacy.ledger_signatures`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared_model.io_utils import write_bytes_atomic


class SigningKeyError(ValueError):
    """A key file that is missing or not an Ed25519 key: ``str(e)`` is one line naming the file."""


def load_or_create_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 private key at ``path``; created (mode 0600) when the file does not exist."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_private_key(path)
    key = Ed25519PrivateKey.generate()
    try:
        os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def _load_pem(path: str | os.PathLike[str], what: str, load: Callable[[bytes], object], kind: type) -> Any:
    """``load`` the PEM file at ``path`` and require an instance of ``kind``; otherwise
    :class:`SigningKeyError` naming the file (``what``: "private" or "public")."""
    try:
        key = load(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: not a readable Ed25519 {what} key ({type(exc).__name__})") from None
    if not isinstance(key, kind):
        raise SigningKeyError(f"{path}: not an Ed25519 {what} key ({type(key).__name__})")
    return key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    return _load_pem(path, "private", lambda b: serialization.load_pem_private_key(b, password=None),
                     Ed25519PrivateKey)


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_public_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> Path:
    """Export ``key``'s public half to ``path`` (PEM, atomic); returns the path."""
    write_bytes_atomic(Path(path), public_pem(key))
    return Path(path)


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; :class:`SigningKeyError` naming the file if it is not one."""
    return _load_pem(path, "public", serialization.load_pem_public_key, Ed25519PublicKey)


def fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """SHA-256 of the public key's PEM, first 16 hex digits (names the key in manifests)."""
    return hashlib.sha256(public_pem(key)).hexdigest()[:16]


def verifies(key: Ed25519PublicKey, signature_hex: str, data: bytes) -> bool:
    """Whether ``signature_hex`` is ``key``'s Ed25519 signature of ``data``."""
    try:
        key.verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError):
        return False
    return True
