"""The silo's side of ``release-metrics``: what of a round's numbers leaves, and the ledger
record that says how (:mod:`shared_model.privacy.metric_release` holds the rules and the
mechanism; this file applies them to a silo's replies).

* :func:`release_evaluation`: ``dp`` → noisy metrics + a ``metric-release`` record (the
  release is refused, and the metrics withheld, when it would exceed the run or lifetime
  budget); ``plain`` → the exact metrics + a ``plain-release`` record; ``none`` → counts only.
* :func:`release_training`: ``plain`` → every number + a ``plain-release`` record naming the
  training by-products; ``dp`` and ``none`` → the public numbers only.

The records are written to the silo's own ledger and travel back in the reply (the server
appends them to its federation ledger), like the DP-SGD round records.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from shared_model.privacy import budget
from shared_model.privacy.metric_release import (EVAL_COORDINATES, SENSITIVITY, classify, evaluation_metrics,
                                                 evaluation_sums, gaussian_noise, keep_public)
from shared_model.privacy.records import MetricRelease, PlainRelease, read_records, write_record
from shared_model.privacy.silo_secret import derive_seed
from shared_model.privacy.state import PrivacyState

if TYPE_CHECKING:
    from fl_client.evaluate import EvalResult
    from fl_client.silo_round import SiloSetup

log = logging.getLogger("fedshift.client")
Metrics = dict[str, Any]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _declare(silo: "SiloSetup", run_id: int | str, server_round: int, phase: str, names: list[str]) -> dict[str, Any]:
    return write_record(silo.ledger, PlainRelease(
        run_id=str(run_id), silo=silo.data.name, round=int(server_round), phase=phase, names=",".join(names),
        policy="release-metrics = plain (the silo's policy and the run's request)", time=_now()))


def release_training(silo: "SiloSetup", metrics: Metrics, run_id: int | str, server_round: int,
                     trained: bool) -> tuple[Metrics, list[dict[str, Any]]]:
    """The train reply's metrics under the silo's mode, and the plain-release record (if any)."""
    if silo.release_metrics != "plain":
        return keep_public(metrics), []
    private = classify(metrics)["private"]
    return dict(metrics), ([_declare(silo, run_id, server_round, "train", private)] if trained and private else [])


def release_evaluation(silo: "SiloSetup", privacy: PrivacyState | None, result: "EvalResult", run_id: int | str,
                       server_round: int) -> tuple[Metrics, list[dict[str, Any]]]:
    """The evaluate reply's metrics under the silo's mode, and the ledger record written."""
    base: Metrics = {"num-examples": result.users, "eval-users": float(result.users),
                     "eval-candidates": float(result.candidates)}
    mode = silo.release_metrics
    if mode == "plain":
        metrics = {"num-examples": result.users, **result.as_metrics()}
        return metrics, [_declare(silo, run_id, server_round, "evaluate", classify(metrics)["private"])]
    if mode != "dp" or privacy is None or result.users == 0 or not result.per_user:
        return base, []
    k = len(EVAL_COORDINATES)
    entry = (privacy.metric_noise_multiplier, 1.0, k)
    refusal = budget.check_entry(privacy, entry, f"a metric release of {k} Gaussian coordinates", silo.lifetime_cap,
                                 read_records(silo.ledger), silo.ledger.path)
    if refusal is not None:
        log.warning("silo %s: round %s: metrics withheld: %s", silo.data.name, server_round, refusal.reason)
        return {**base, "metrics-withheld": 1}, []
    u = result.per_user
    sums = evaluation_sums(u["correct"], u["hits"], u["ndcgs"], u["rrs"], u["migrating"])
    seed = derive_seed(silo.secret, run_id, silo.data.name, server_round, "metrics-evaluate")
    noisy = gaussian_noise(sums, privacy.metric_noise_multiplier, seed)
    eps_release = privacy.epsilon_of([entry])
    privacy.record_release(k)
    record = write_record(silo.ledger, MetricRelease(
        run_id=str(run_id), silo=silo.data.name, round=int(server_round), phase="evaluate",
        names=",".join(EVAL_COORDINATES), releases=k, noise_multiplier=float(privacy.metric_noise_multiplier),
        sensitivity=SENSITIVITY, delta=float(privacy.delta), accountant=privacy.accountant,
        epsilon_release=float(eps_release), epsilon_cumulative=float(privacy.epsilon_spent),
        epsilon_budget=float(privacy.epsilon_budget), public_counts=f"eval-users={result.users}", time=_now()))
    return {**base, **evaluation_metrics(noisy, result.users)}, [record]
