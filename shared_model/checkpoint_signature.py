"""Signed checkpoints: a manifest of every file's SHA-256, signed by the server with Ed25519.

``<checkpoint>/manifest.json`` lists every file of the checkpoint folder (relative path →
SHA-256) and the signing key's fingerprint; ``<checkpoint>/manifest.sig`` is the hex Ed25519
signature of manifest.json's exact bytes. :func:`sign_checkpoint` writes both (the server
calls it inside :func:`shared_model.adapters.save_checkpoint`'s temp folder, so a checkpoint
appears signed or not at all); :func:`verify_checkpoint` lists every problem: a bad
signature, a changed byte, a missing file, an added file.

Not covered: ``item-index.pt``, the item-embedding cache that ``evaluate``/``recommend``
write beside a checkpoint later (:mod:`shared_model.checkpoint_index`); it is derived data,
keyed by the checkpoint's own hash, and is ignored by both functions.

Private key: ``RUN/server/signing.key`` (0600, the server's side of the run folder); public
key: ``RUN/server-signing.pub`` (:func:`run_signing_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared_model.io_utils import write_bytes_atomic
from shared_model.signing import fingerprint, load_or_create_private_key, verifies, write_public_key

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "fedshift-checkpoint-manifest/1"
DERIVED = ("item-index.pt",)  # written after signing by evaluate/recommend; see the module docstring
SERVER_KEY = Path("server") / "signing.key"
SERVER_PUB = "server-signing.pub"


def run_signing_key(run_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The run's checkpoint-signing key (created on first use, reused on resume) with its
    public key written beside the run as ``RUN/server-signing.pub``."""
    run_dir = Path(run_dir)
    key = load_or_create_private_key(run_dir / SERVER_KEY)
    os.chmod(run_dir / SERVER_KEY.parent, 0o700)
    write_public_key(key, run_dir / SERVER_PUB)
    return key


def _files(folder: Path) -> dict[str, str]:
    """Relative POSIX path → SHA-256 of every file in ``folder`` (manifest and derived files left out)."""
    out: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE, *DERIVED):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def sign_checkpoint(folder: str | os.PathLike[str], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Write ``manifest.json`` and ``manifest.sig`` into ``folder``; returns the manifest."""
    folder = Path(folder)
    manifest = {"format": FORMAT, "key-fingerprint": fingerprint(key), "files": _files(folder)}
    data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    write_bytes_atomic(folder / MANIFEST, data)
    write_bytes_atomic(folder / SIGNATURE, key.sign(data).hex().encode() + b"\n")
    return manifest


def verify_checkpoint(folder: str | os.PathLike[str], public_key: Ed25519PublicKey) -> list[str]:
    """Every problem with the signed checkpoint ``folder``, one line each (``[]``: intact).

    Each line names the file: ``FOLDER/NAME: changed`` / ``missing`` / ``added (not in the
    signed manifest)``, or the manifest when it is absent, unreadable or its signature fails."""
    folder = Path(folder)
    manifest_path, sig_path = folder / MANIFEST, folder / SIGNATURE
    if not manifest_path.is_file() or not sig_path.is_file():
        return [f"{manifest_path if not manifest_path.is_file() else sig_path}: missing (the checkpoint is not signed)"]
    data = manifest_path.read_bytes()
    if not verifies(public_key, sig_path.read_text().strip(), data):
        return [f"{manifest_path}: signature does not verify with the given public key "
                f"(key {fingerprint(public_key)}); the manifest was altered or signed by another key"]
    try:
        signed = json.loads(data)["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{manifest_path}: signed but not a {FORMAT} manifest"]
    actual = _files(folder)
    problems = [f"{folder / name}: changed (sha256 {actual[name][:12]}…, signed {digest[:12]}…)"
                for name, digest in sorted(signed.items()) if name in actual and actual[name] != digest]
    problems += [f"{folder / name}: missing (listed in the signed manifest)" for name in sorted(signed) if name not in actual]
    problems += [f"{folder / name}: added (not in the signed manifest)" for name in sorted(actual) if name not in signed]
    return problems
