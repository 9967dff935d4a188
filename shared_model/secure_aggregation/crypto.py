"""The cryptographic primitives of secure aggregation, all from ``cryptography``:

* X25519 key agreement, its shared secret stretched by HKDF-SHA256 into a 32-byte key
  bound to a purpose (``mask`` or ``share``) and the round;
* a mask stream: ChaCha20 keystream under a 32-byte seed, read as little-endian uint32
  (the PRG of the protocol);
* ChaCha20-Poly1305 encryption of one silo's shares for another (random nonce; the
  associated data names the round, the sender and the receiver, so a relayed ciphertext
  cannot be passed off as another pair's).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12


class DecryptionError(ValueError):
    """A share ciphertext that does not authenticate (altered, or not meant for this pair)."""


def new_private_key() -> bytes:
    """A fresh X25519 private key, raw 32 bytes."""
    return X25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())


def public_key(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agreed_key(private: bytes, peer_public: bytes, purpose: str, server_round: int) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret of ``private`` and ``peer_public``: the same
    32 bytes on both sides of the pair, different per ``purpose`` and round."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = f"fedshift secure aggregation/{purpose}/round {server_round}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def mask_stream(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint32 values: the ChaCha20 keystream under ``seed`` (32 bytes)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (4 * length)), dtype="<u4").astype(np.uint32)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)
    except InvalidTag:
        raise DecryptionError(f"a share ciphertext does not authenticate ({associated.decode()})") from None
