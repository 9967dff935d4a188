"""What a run folder holds, for resuming it (``fedshift simulate|deploy local --resume RUN_DIR``).

A run folder is what the ServerApp writes to ``out-dir``: ``metrics.json`` (its ``run``
section holds the Flower run id and the whole run config) and ``checkpoints/round-NNN/``
(the global model after round NNN; round 000 is the initial model). :func:`resume_plan`
reads it and says how to continue: the run config of the resumed run (the recorded one,
with ``resume-run-id`` naming the ORIGINAL run, whose budget every silo keeps charging on
its own ledger), the last checkpoint and the rounds left. :class:`ResumeError` (a
``ValueError``, one line naming the file) when the folder is not a run, has no checkpoint,
or what the caller asks conflicts with the recorded config. No flwr import: the CLI and
the ServerApp both call it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_model.config import ConfigError, RunConfig

METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
META_FILE = "fedshift.json"  # shared_model.adapters.META_FILE (not imported: that pulls in torch)
_ROUND = re.compile(r"^round-(\d{3,})$")
#: Keys a resumed run may not ask to change (all but where it writes and which run it resumes):
#: σ is calibrated from them, so a change would break the privacy plan the silos' ledgers follow.
FREE_KEYS = frozenset({"out-dir", "resume-run-id"})


class ResumeError(ValueError):
    """A folder cannot be resumed (one line, naming the file)."""


@dataclass(frozen=True)
class ResumePlan:
    run_dir: Path
    run_id: str  # the ORIGINAL run's id (resuming a resumed run keeps it)
    cfg: RunConfig  # the recorded config, out-dir = run_dir, resume-run-id = run_id
    last_round: int  # the round of the last checkpoint
    checkpoint: Path

    @property
    def finished(self) -> bool:
        return self.last_round >= self.cfg.num_server_rounds

    @property
    def rounds_left(self) -> int:
        return max(0, self.cfg.num_server_rounds - self.last_round)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``run_dir/metrics.json`` with a ``run`` section that names the run id and its config."""
    path = Path(run_dir) / METRICS
    if not Path(run_dir).is_dir():
        raise ResumeError(f"{run_dir}: not a folder")
    if not path.is_file():
        raise ResumeError(f"{path}: missing; {run_dir} is not a fedshift run folder")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path}: not readable JSON ({exc})") from None
    run = doc.get("run") if isinstance(doc, dict) else None
    if not isinstance(run, dict) or "run-id" not in run or not isinstance(run.get("config"), dict):
        raise ResumeError(f"{path}: no run section with run-id and config; not a fedshift run folder")
    return doc


def last_checkpoint(run_dir: Path) -> tuple[int, Path]:
    """(round, folder) of the newest complete checkpoint (one with its metadata file)."""
    folder = Path(run_dir) / CHECKPOINTS
    found = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else ())
                   if (m := _ROUND.match(p.name)) and (p / META_FILE).is_file())
    if not found:
        raise ResumeError(f"{folder}: no checkpoint (round-NNN/{META_FILE}); nothing to resume from")
    return found[-1]


def resume_plan(run_dir: str | Path, asked: dict[str, Any] | None = None) -> ResumePlan:
    """How to resume ``run_dir``; ``asked``: dashed run-config values the caller set explicitly,
    each of which must equal the recorded one (else :class:`ResumeError`)."""
    run_dir = Path(run_dir).expanduser().resolve()
    doc = read_metrics(run_dir)
    path = run_dir / METRICS
    try:
        recorded = RunConfig.from_run_config(doc["run"]["config"])
    except ConfigError as exc:
        raise ResumeError(f"{path}: run.config: {exc}") from None
    for key, value in (asked or {}).items():
        if key in FREE_KEYS:
            continue
        try:
            wanted = recorded.replace(**{key: value}).to_run_config()[key]
        except ConfigError as exc:
            raise ResumeError(f"{path}: {exc}") from None
        if wanted != recorded.to_run_config()[key]:
            raise ResumeError(f"{path}: {key} = {wanted!r} conflicts with the run's recorded {key} = "
                              f"{recorded.to_run_config()[key]!r}; a resumed run keeps its config")
    run_id = str(recorded.resume_run_id or doc["run"]["run-id"])
    last, checkpoint = last_checkpoint(run_dir)
    cfg = recorded.replace(**{"out-dir": str(run_dir), "resume-run-id": run_id})
    return ResumePlan(run_dir, run_id, cfg, last, checkpoint)
