"""Signed ledger records: each silo signs every record it writes with its own Ed25519 key.

A hash chain shows only that no line was edited by someone who could not recompute it;
anyone holding the file can. A signature can be made only with the silo's private key
(``<state-root>/<silo>/ledger-signing.key``, 0600, created on first use; public half
``<state-root>/<silo>/ledger-signing.pub``). The signature is the line's ``signature``
field (hex), over the canonical JSON of the typed record (:func:`signed_bytes`: kind and
fields as :func:`shared_model.privacy.records.parse_record` reads them; the chain fields
and the server's envelope left out). The record travels to the server with its signature,
and the server's federation ledger keeps it, so one public key verifies the line in both
ledgers (:func:`signature_problems`).

Lines written before signing existed stay parseable; checked against keys they are
reported ``unsigned``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from shared_model.io_utils import write_bytes_atomic
from shared_model.privacy.ledger import LedgerError
from shared_model.privacy.records import ENVELOPE, parse_record
from shared_model.signing import (SigningKeyError, load_or_create_private_key, load_public_key, verifies,
                                  write_public_key)

SIGNATURE = "signature"
KEY_NAME = "ledger-signing.key"
PUB_NAME = "ledger-signing.pub"


def signed_bytes(record: Mapping[str, Any]) -> bytes:
    """What a silo signs: the typed record's canonical JSON (chain and envelope keys left out)."""
    typed = parse_record({k: v for k, v in record.items() if k not in ENVELOPE})
    return json.dumps(typed.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def silo_signer(state_root: str | os.PathLike[str], silo: str) -> Callable[[Mapping[str, Any]], str]:
    """The silo's record signer (hex signature of :func:`signed_bytes`); creates its key pair
    on first use and (re)exports the public key beside it."""
    folder = Path(state_root) / silo
    key = load_or_create_private_key(folder / KEY_NAME)
    if not (folder / PUB_NAME).is_file():
        write_public_key(key, folder / PUB_NAME)
    return lambda record: key.sign(signed_bytes(record)).hex()


def gather_public_keys(state_root: str | os.PathLike[str], silos: Iterable[str], dest: str | os.PathLike[str]) -> Path:
    """Each silo's ledger public key (its key pair created if absent) copied to ``dest/<silo>.pub``:
    what ``fedshift audit RUN --silo-keys RUN/silo-keys`` reads. Public halves only."""
    dest = Path(dest)
    for silo in silos:
        silo_signer(state_root, silo)
        write_bytes_atomic(dest / f"{silo}.pub", (Path(state_root) / silo / PUB_NAME).read_bytes())
    return dest


def public_key_path(keys_dir: str | os.PathLike[str], silo: str) -> Path | None:
    """``DIR/<silo>.pub`` (gathered beside a run) or ``DIR/<silo>/ledger-signing.pub`` (a state root)."""
    for path in (Path(keys_dir) / f"{silo}.pub", Path(keys_dir) / silo / PUB_NAME):
        if path.is_file():
            return path
    return None


def signature_problems(lines: Iterable[Mapping[str, Any]], keys_dir: str | os.PathLike[str],
                       ledger_name: str = "ledger.jsonl") -> list[str]:
    """One ``ledger.jsonl:LINE: reason`` per record whose signature is absent or does not verify
    with its silo's public key from ``keys_dir``; ``[]`` when every line verifies.

    Raises :class:`~shared_model.signing.SigningKeyError` for a key file that is not a key."""
    problems: list[str] = []
    keys: dict[str, Any] = {}
    for number, line in enumerate(lines, start=1):
        silo = str(line.get("silo", ""))
        where = f"{ledger_name}:{number}"
        if silo not in keys:
            path = public_key_path(keys_dir, silo)
            keys[silo] = (load_public_key(path), path) if path else None
        if keys[silo] is None:
            problems.append(f"{where}: no public key for silo {silo!r} in {keys_dir}")
        elif not line.get(SIGNATURE):
            problems.append(f"{where}: unsigned (silo {silo})")
        elif not verifies(keys[silo][0], str(line[SIGNATURE]), _signed_or_empty(line)):
            problems.append(f"{where}: signature does not verify with {keys[silo][1]} "
                            f"(the record was edited after silo {silo} signed it)")
    return problems


def _signed_or_empty(line: Mapping[str, Any]) -> bytes:
    """:func:`signed_bytes`, or ``b""`` (verifies nothing) for a line that is no record."""
    try:
        return signed_bytes(line)
    except LedgerError:
        return b""


__all__ = ["SIGNATURE", "SigningKeyError", "gather_public_keys", "public_key_path", "signature_problems", "signed_bytes", "silo_signer"]
