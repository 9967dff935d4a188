"""Whether a finished run is healthy, read from the ``metrics.json`` its server wrote
(``problems`` and ``outcomes``, :mod:`fl_server.records`): what ``fedshift simulate``,
``experiment`` and ``deploy`` call to choose their exit status.

A run is unhealthy when a round had no successful training reply (and not only because
every silo declined by its own policy, e.g. an exhausted privacy budget) or no successful
evaluation reply, when no silo trained in any round at all (every silo refused the run
under its own privacy policy: nothing was learnt), or when any silo's reply failed or its update was refused (non-finite,
wrong shape, implausible ``num-examples``...). Each problem is one line naming the round,
the phase, the silo and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_problems(metrics_json: str | Path) -> list[str]:
    """One line per problem of the run (empty: healthy). A missing or unreadable
    ``metrics.json`` is itself a problem."""
    path = Path(metrics_json)
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{path}: cannot read the run's metrics ({exc})"]
    lines = []
    for o in doc.get("outcomes", []):
        if o.get("ok", 0) == 0 and (o.get("failed", 0) > 0 or o.get("declined", 0) == 0):
            lines.append(f"round {o['round']}: no successful {o['phase']} reply "
                         f"({o.get('failed', 0)} failed, {o.get('declined', 0)} declined)")
    train = [o for o in doc.get("outcomes", []) if o.get("phase") == "train"]
    if train and not any(o.get("ok", 0) for o in train) and not any("train reply" in line for line in lines):
        lines.append(f"no silo trained in any of {len(train)} round(s): every reply failed or was declined "
                     "(see the refusals above and in metrics.json)")
    for p in doc.get("problems", []):
        if p.get("kind") == "capped":
            continue  # a capped weight is recorded, the update was still used
        lines.append(f"round {p['round']}: {p['phase']}: silo {p['silo']}: {p['kind']}: {p['reason']}")
    return lines


def report_problems(command: str, metrics_json: str | Path, stream: Any) -> int:
    """Print the run's problems to ``stream`` as ``fedshift COMMAND: ...`` lines; 1 when
    there are any, else 0 (the exit status to return)."""
    lines = run_problems(metrics_json)
    for line in lines:
        print(f"fedshift {command}: {line}", file=stream, flush=True)
    return 1 if lines else 0
