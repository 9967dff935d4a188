"""Round timings read from a Flower run's log (OUT/flwr.log of ``fedshift simulate``).

Flower writes each record twice when streaming; the dated copy
(``11/29/2026 05:34:46:INFO:[ROUND 1/3]``) carries the ServerApp's clock to the second.
A round runs from its ``[ROUND k/N]`` line to the ``aggregate_evaluate`` line that follows
(train, aggregate, checkpoint, then federated evaluation); its training part ends at
``aggregate_train``. Round 0 (the untrained model's evaluation, which also starts the Ray
actors and loads the model in each) runs from the first ``configure_evaluate`` to its
``aggregate_evaluate``. Resolution: one second per timestamp.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

_DATED = re.compile(r"^(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d):[A-Z]+:(.*)$")
_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def _events(text: str) -> list[tuple[datetime, str]]:
    out = []
    for line in text.splitlines():
        if m := _DATED.match(line.strip()):
            out.append((datetime.strptime(m.group(1), "%m/%d/%Y %H:%M:%S"), m.group(2)))
    return out


def round_times(log: str | Path) -> dict:
    """``{"round0_s", "rounds": [{"round", "train_s", "evaluate_s", "round_s"}], "strategy_s"}``
    from a Flower log (text or file). A round whose end is missing (the run stopped) is left out."""
    text = Path(log).read_text(errors="replace") if isinstance(log, Path) else log
    events = _events(text)
    rounds: list[dict] = []
    current: dict | None = None
    round0_start = round0_s = None
    strategy_s = None
    for when, msg in events:
        if m := _ROUND.search(msg):
            current = {"round": int(m.group(1)), "start": when}
        elif msg.startswith("configure_evaluate") and current is None and round0_start is None:
            round0_start = when
        elif msg.startswith("aggregate_train") and current is not None:
            current["train_end"] = when
        elif msg.startswith("aggregate_evaluate"):
            if current is None and round0_start is not None and round0_s is None:
                round0_s = (when - round0_start).total_seconds()
            elif current is not None and "train_end" in current:
                rounds.append({
                    "round": current["round"],
                    "train_s": (current["train_end"] - current["start"]).total_seconds(),
                    "evaluate_s": (when - current["train_end"]).total_seconds(),
                    "round_s": (when - current["start"]).total_seconds(),
                })
                current = None
        elif m := re.search(r"Strategy execution finished in ([0-9.]+)s", msg):
            strategy_s = float(m.group(1))
    return {"round0_s": round0_s, "rounds": rounds, "strategy_s": strategy_s}
