"""Atomic, reproducible file writing shared by the converter and the generator."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]], compress: bool) -> bytes:
    """CSV text (``\\n`` line ends, UTF-8); gzip with mtime 0 and no file name when ``compress``."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    if not compress:
        return data
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV atomically; gzip-compressed (reproducibly) when the name ends in ``.gz``."""
    write_bytes_atomic(path, csv_bytes(header, rows, compress=str(path).endswith(".gz")))


def toml_value(value: Any) -> str:
    """One TOML value: a bool, a number, or a basic string. A string keeps every character but
    those TOML requires escaped (quote, backslash, control characters). Plain ``json.dumps``
    is not TOML: it writes a non-BMP character as a surrogate pair (``\\ud83d\\ude00``), which
    TOML rejects, and leaves U+007F raw, which TOML forbids."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
