"""Randomness the server cannot know: a secret only the silo holds, and seeds derived from it.

Amplification by subsampling (the reason q ≈ 0.01 gives a small ε) assumes the adversary
does not know which users a step sampled, and the Gaussian mechanism assumes it does not
know the noise. Opacus's ``secure_mode`` would draw both from a CSPRNG but needs
torchcsprng, which is not installable here; instead each silo keeps a 32-byte secret and
seeds the Poisson sampling, the DP noise and the history cuts of its training examples with
``HMAC-SHA256(secret, "run-id/silo/round/purpose")`` (RFC 2104). The server's run
``seed`` never enters these seeds; it shapes only the initial weights and evaluation
samples.

Where the secret comes from: node config ``silo-secret`` (hex, at least 32 hex digits),
else the file ``<state-root>/<silo>/secret`` (32 bytes, mode 0600), created on first use
from ``os.urandom``. ``fedshift simulate`` writes these files from a local simulation seed
(:func:`secret_from_seed`) so simulations are reproducible without the server knowing it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SECRET_NAME = "secret"
SECRET_BYTES = 32


class SecretError(ValueError):
    """A silo secret that is malformed: one line naming where it came from."""


def secret_path(state_root: str | os.PathLike[str], silo: str) -> Path:
    return Path(state_root) / silo / SECRET_NAME


def write_secret(path: Path, secret: bytes) -> bool:
    """Create the secret file (0600) holding ``secret``; False (and nothing written) when it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def load_secret(state_root: str | os.PathLike[str], silo: str, node_config: Mapping[str, Any]) -> bytes:
    """The silo's secret (see the module docstring); created on first use when absent."""
    given = str(node_config.get("silo-secret") or "")
    if given:
        try:
            secret = bytes.fromhex(given)
        except ValueError:
            raise SecretError("node config silo-secret: expected hex digits") from None
        if len(secret) < SECRET_BYTES // 2:
            raise SecretError(f"node config silo-secret: {len(secret)} bytes; need at least {SECRET_BYTES // 2}")
        return secret
    path = secret_path(state_root, silo)
    write_secret(path, os.urandom(SECRET_BYTES))
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise SecretError(f"{path}: {len(secret)} bytes; a silo secret is {SECRET_BYTES} bytes")
    return secret


def derive_seed(secret: bytes, run_id: int | str, silo: str, server_round: int, purpose: str) -> int:
    """A 63-bit seed: HMAC-SHA256(secret, "run-id/silo/round/purpose")."""
    mac = hmac.new(secret, f"{run_id}/{silo}/{server_round}/{purpose}".encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "little") & (2**63 - 1)


def secret_from_seed(seed: int | str, silo: str) -> bytes:
    """A reproducible silo secret from a *local* simulation seed (never the run config's)."""
    return hmac.new(str(seed).encode(), f"fedshift-silo-secret/{silo}".encode(), hashlib.sha256).digest()
