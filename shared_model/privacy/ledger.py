"""The privacy ledger: an append-only, hash-chained JSON-lines file of privacy events.

One line per record (a DP-SGD round a silo ran, a refusal, …; the kinds and their
fields are in :mod:`shared_model.privacy.records`, this file knows only lines). Each line
is a flat JSON object carrying two extra fields: ``prev-sha256`` (the ``sha256`` of the line before, 64 zeros for the first) and
``sha256`` (SHA-256 of the line's canonical JSON without that field). A line that is
truncated, not JSON, edited, reordered or removed is reported as ``ledger.jsonl:LINE:
reason``. Appends are one ``write`` of a whole line followed by ``fsync``, so a crash can
leave at most a partial last line, which :meth:`Ledger.read` reports (never ignores).

The same format serves the silo's own ledger (``<state-dir>/<silo>/ledger.jsonl``, the
silo's durable privacy state) and the server's federation ledger (``<out-dir>/ledger.jsonl``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
LEDGER_NAME = "ledger.jsonl"


class LedgerError(ValueError):
    """A ledger line that fails to parse or verify: ``str(e)`` is ``file:LINE: reason``."""

    def __init__(self, path: Path, line: int, reason: str):
        self.path, self.line, self.reason = Path(path), line, reason
        super().__init__(f"{self.path.name}:{line}: {reason}")


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON, ignoring its own ``sha256`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "sha256"})).hexdigest()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"ledger values must be finite numbers, got {value}")
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Ledger:
    """An append-only hash-chained ledger file (single writer). With ``signer`` (a silo's,
    :func:`shared_model.privacy.ledger_signatures.silo_signer`) every appended record also
    carries its ``signature``."""

    def __init__(self, path: str | os.PathLike[str], signer: Callable[[Mapping[str, Any]], str] | None = None):
        self.path = Path(path)
        self.signer = signer

    def read(self) -> list[dict[str, Any]]:
        """All records, verified; raises :class:`LedgerError` at the first bad line."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        records: list[dict[str, Any]] = []
        prev = GENESIS
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            # No newline at the end: an interrupted append.
            raise LedgerError(self.path, len(lines), "truncated record (no end of line; interrupted write?)")
        for number, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise LedgerError(self.path, number, f"not a JSON record ({exc.__class__.__name__}: {exc})") from None
            if not isinstance(rec, dict):
                raise LedgerError(self.path, number, "not a JSON object")
            if rec.get("prev-sha256") != prev:
                raise LedgerError(self.path, number, "chain broken: prev-sha256 does not match the line before "
                                  "(a record was removed, reordered or inserted)")
            if rec.get("sha256") != record_hash(rec):
                raise LedgerError(self.path, number, "checksum mismatch: the record was altered after it was written")
            prev = rec["sha256"]
            records.append(rec)
        return records

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Verify the existing file, then append ``record`` (with chain fields) + fsync."""
        existing = self.read()
        prev = existing[-1]["sha256"] if existing else GENESIS
        rec = {k: _clean(v) for k, v in record.items() if k not in {"sha256", "prev-sha256"}}
        if self.signer is not None:
            rec["signature"] = self.signer(rec)
        rec["prev-sha256"] = prev
        rec["sha256"] = record_hash(rec)
        line = _canonical(rec) + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if len(existing) == 0:  # make the new directory entry durable too
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return rec


def default_state_root() -> Path:
    """``$FEDSHIFT_STATE`` or ``~/.local/share/fedshift`` (stable across runs)."""
    env = os.environ.get("FEDSHIFT_STATE")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "fedshift"


def state_root(node_config: Mapping[str, Any]) -> Path:
    """A silo's state root: node config ``state-dir``, else :func:`default_state_root`.

    Never the run config: the server must not be able to point a silo's ledger, policy or
    secret at another folder (an empty ledger would reset the silo's lifetime spend)."""
    root = str(node_config.get("state-dir") or "")
    return (Path(root).expanduser() if root else default_state_root()).resolve()


def silo_ledger_path(silo: str, node_config: Mapping[str, Any]) -> Path:
    """Where a silo keeps its ledger: ``<state root>/<silo>/ledger.jsonl`` (:func:`state_root`)."""
    return state_root(node_config) / silo / LEDGER_NAME
