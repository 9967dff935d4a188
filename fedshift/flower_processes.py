"""The process plumbing that `fedshift simulate` and `fedshift deploy local` share: the
environment Flower's processes run with, free ports on 127.0.0.1, the run-config file given to
``flwr run``, relaying Flower's stream (round progress and fedshift's per-round table), and
turning SIGTERM/SIGHUP into an unwinding exit so started processes are stopped."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, TextIO

from shared_model.io_utils import toml_value

APP_DIR = Path(__file__).resolve().parents[1]
FLOWER_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_LOG_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)?(INFO|WARNING|ERROR|DEBUG)\s*(\x1b\[0m)?:\s*")
_DATED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")


def app_files(app_dir: Path = APP_DIR) -> dict[str, Path]:
    """The files ``flwr run APP_DIR`` puts in the app's FAB: Flower's own publish filter
    (include, exclude and ``.gitignore`` rules) over the app folder, walked without entering a
    folder those rules drop whole (``.venv``, ``runs/``). Flower 1.42 walks every file first
    (the 50,000 of a ``.venv`` take seconds per run); the result is the same set."""
    from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    ignore = app_dir / ".gitignore"
    ignored = load_gitignore_patterns(ignore.read_bytes() if ignore.is_file() else b"")
    # a "!pattern" can bring back a file under an ignored folder (Flower's matcher, unlike git):
    # then only the folders Flower always excludes are skipped
    skip = [] if any(p.lstrip().startswith("!") for p in ignored) else ignored
    dropped = build_pathspec((*skip, *APP_PUBLISH_EXCLUDE_PATTERNS))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        rel = Path(dirpath).relative_to(app_dir)
        dirnames[:] = [d for d in dirnames if not dropped.match_file(f"{(rel / d).as_posix()}/")]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():  # Flower skips symlinks too
                files[(rel / name).as_posix()] = path
    return {k: v for k, v in filter_paths_for_publish(files).items() if isinstance(v, Path)}


def copy_app(dest: Path, app_dir: Path = APP_DIR) -> Path:
    """``dest`` holding exactly the app's FAB files (:func:`app_files`), for ``flwr run dest``."""
    for rel, path in app_files(app_dir).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
    return dest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_run_config(config: dict[str, Any], path: Path) -> Path:
    """``config`` as the TOML file ``flwr run --run-config`` reads."""
    from shared_model.io_utils import write_bytes_atomic

    write_bytes_atomic(path, "".join(f"{k} = {toml_value(v)}\n" for k, v in sorted(config.items())).encode())
    return path


def terminate(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP: unwind through ``finally`` so the local SuperLink, its simulation
    process and Ray workers are stopped instead of orphaned."""
    raise SystemExit(128 + signum)


def relay(lines: Any, log: Any, verbose: bool, started: float, stream: TextIO) -> None:
    """Copy Flower's stream to ``log``; show round progress and fedshift's tables.

    Flower prints each log record twice when streaming (coloured, then dated); the
    dated copy and its continuation lines are skipped.
    """
    dated = in_table = False
    for raw in lines:
        log.write(raw)
        log.flush()  # others follow the log while the run goes on
        line = raw.rstrip("\n")
        if _DATED.match(line):
            dated, in_table = True, False
            continue
        if _LOG_PREFIX.match(line):
            dated, in_table = False, False
            line = _LOG_PREFIX.sub("", line)
        elif dated:
            continue
        if verbose:
            print(line, file=stream, flush=True)
            continue
        if m := re.search(r"\[ROUND (\d+)/(\d+)\]", line):
            print(f"[{time.time() - started:6.0f} s] round {m.group(1)}/{m.group(2)} …", file=stream, flush=True)
        elif line.startswith("round ") and "ε is cumulative" in line:
            in_table = True
            print(line, file=stream, flush=True)
        elif in_table or line.startswith("fedshift:") or "ERROR" in raw or "Traceback" in line:
            print(line, file=stream, flush=True)
