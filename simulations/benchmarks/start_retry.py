"""Run a benchmark's simulation again when it never started: on a loaded machine Flower's local
SuperLink or Ray's local node can miss a fixed start-up time (neither has a flag), and then no
round runs. Only such a start failure is retried; any other failure is the benchmark's result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

START_FAILURES = (
    "Failed to start local SuperLink",  # flwr 1.42: fixed 15 s (LOCAL_SUPERLINK_STARTUP_TIMEOUT, no flag)
    "The current node timed out during startup",  # ray 2.55: raylet must register within a fixed 30 s
)


def start_failed(log: Path, status: str = "") -> bool:
    """Flower's SuperLink or Ray's node missed its fixed start-up time, so no round ran: the
    log names it, or Flower knows of no run at all (``status == "no run"``)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return status == "no run" or any(marker in text for marker in START_FAILURES)


def run_with_start_retries(cfg: Any, out: Path, *, attempts: int = 3,
                           on_retry: Callable[[int], None] | None = None, **kwargs: Any) -> tuple[Any, int]:
    """:func:`fedshift.simulation.run_simulation` up to ``attempts`` times while it fails to
    start; returns the last result and the number of attempts made. ``on_retry(n)`` is called
    before attempt n (n ≥ 2)."""
    from fedshift.simulation import run_simulation

    for attempt in range(1, attempts + 1):
        result = run_simulation(cfg, out, **kwargs)
        if result.ok or attempt == attempts or not start_failed(result.log, result.status):
            return result, attempt
        if on_retry:
            on_retry(attempt + 1)
    raise AssertionError("unreachable")
