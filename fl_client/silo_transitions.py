"""The silo's item-transition release (``transitions``): Gaussian counts of its training users'
item-to-item transitions over the server's public candidate pairs, composed in the silo's own
accountant and written to its ledger.

:func:`release_transitions` first checks the query (:func:`shared_model.transitions.query_problem`:
both candidate arrays, one length, a < b, rows of the silo's platform, sorted and unique, at
most platform items × (``transition-neighbours`` + ``transition-popular``), the silo's own
config) before touching data; then counts each training user's ``transition-max-pairs`` most
recent distinct unordered pairs over the candidates (pairs outside are not counted), adds
Gaussian noise of multiplier z (calibrated with the run: :meth:`PrivacyState.calibrate`) to
every candidate coordinate from the silo's secret randomness, and writes a
``transition-release`` record. The release is refused (nothing leaves, nothing is spent)
when the query is malformed, when it would exceed the run or lifetime budget, or when the
silo has already released for this run.

With ``dp = false`` (a non-private run) the exact counts of every observed pair leave (sparse:
pair rows and counts), declared outside ε by a ``plain-release`` record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from fl_client.silo_gate import Gate
from fl_client.silo_round import SiloSetup, privacy_for
from shared_model.examples import train_user_ids
from shared_model.privacy import budget
from shared_model.privacy.records import PlainRelease, TransitionRelease, of_run, read_records, write_record
from shared_model.privacy.silo_secret import derive_seed
from shared_model.privacy.state import PrivacyState
from shared_model.transitions import counts_over, noisy_counts, pair_counts, query_problem, sensitivity

log = logging.getLogger("fedshift.client")


@dataclass
class TransitionReply:
    status: str  # "released" | "refused" | "exact" (dp = false)
    info: dict[str, str]
    counts: np.ndarray | None = None  # released: one per candidate pair; exact: one per pair in ``a``, ``b``
    a: np.ndarray | None = None  # exact (dp = false) only: the observed pairs' item rows, a < b
    b: np.ndarray | None = None
    noise_std: float = 0.0  # standard deviation of each count's noise (public: z·√m)
    reason: str = ""
    privacy: PrivacyState | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


def refused_transitions(gate: Gate) -> TransitionReply:
    """The policy refused the request: release nothing (the train round records the refusal)."""
    assert gate.refusal is not None
    return TransitionReply("refused", {"silo": gate.silo}, reason=gate.refusal.reason)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def release_transitions(silo: SiloSetup, run_id: int | str, candidates: tuple[np.ndarray | None, np.ndarray | None],
                        privacy: PrivacyState | None = None, server_round: int = 0) -> TransitionReply:
    """The silo's transition counts over ``candidates`` (the query's ``(a, b)``, None where an
    array is absent) as its policy and budget allow (see the module docstring)."""
    cfg, data = silo.cfg, silo.data
    info = {**silo.info, "max-pairs": str(cfg.transition_max_pairs)}
    held = ",".join(data.platforms)
    if not cfg.transitions:
        return TransitionReply("refused", info, reason="this run asked for no transition release (transitions = false)")
    if not cfg.dp:
        users = train_user_ids(data.silo)
        a, b, counts = pair_counts(data.silo, users, data.items.row, cfg.transition_max_pairs)
        record = write_record(silo.ledger, PlainRelease(
            run_id=str(run_id), silo=data.name, round=int(server_round), phase="transitions",
            names=f"transition-counts ({len(a)} observed pairs of {held}, ≤{cfg.transition_max_pairs} per "
                  "user)", policy="dp = false (a non-private run)", time=_now()))
        return TransitionReply("exact", info, counts, a, b, 0.0, records=[record])
    rows = data.platform_rows().numpy()
    # each item's neighbours and popular items, in each space it is in (its platform's, and each cross space)
    limit = len(rows) * (cfg.transition_neighbours + cfg.transition_popular) * len(data.platforms)
    order = None
    if candidates[0] is not None and candidates[1] is not None and len(data.platforms) > 1:
        # a region silo's spaces come one after another: checked (disjoint, so √m holds) and counted sorted
        order = np.argsort(np.asarray(candidates[0], dtype=np.int64) * len(data.items.item_ids)
                           + np.asarray(candidates[1], dtype=np.int64), kind="stable")
        candidates = (np.asarray(candidates[0])[order], np.asarray(candidates[1])[order])
    problem = query_problem(candidates[0], candidates[1], rows, len(data.items.item_ids), limit)
    if problem is not None:
        log.warning("silo %s: transition query refused: %s", data.name, problem)
        return TransitionReply("refused", info, reason=f"malformed transition query: {problem}")
    state = privacy_for(silo, run_id, privacy)
    if state.transition_noise_multiplier <= 0:
        return TransitionReply("refused", info, reason="this run planned no transition release", privacy=state)
    records = read_records(silo.ledger)
    if of_run([r for r in records if isinstance(r, TransitionRelease)], run_id, data.name):
        return TransitionReply("refused", info, reason=f"silo {data.name} already released its transition counts for "
                               f"run {run_id}", privacy=state)
    entry = (state.transition_noise_multiplier, 1.0, 1)
    refusal = budget.check_entry(state, entry, "the transition release", silo.lifetime_cap, records, silo.ledger.path)
    if refusal is not None:
        log.warning("silo %s: transition release withheld: %s", data.name, refusal.reason)
        return TransitionReply("refused", info, reason=refusal.reason, privacy=state)
    cand = (np.asarray(candidates[0], dtype=np.int64), np.asarray(candidates[1], dtype=np.int64))
    users = train_user_ids(data.silo)
    counts = counts_over(pair_counts(data.silo, users, data.items.row, cfg.transition_max_pairs), cand,
                         len(data.items.item_ids))
    if order is not None:  # back to the query's order
        unsorted = np.empty_like(counts)
        unsorted[order] = counts
        counts = unsorted
    seed = derive_seed(silo.secret, run_id, data.name, server_round, "transitions")
    noisy = noisy_counts(counts, state.transition_noise_multiplier, cfg.transition_max_pairs, seed)
    eps_release = state.epsilon_of([entry])
    state.record_transitions()
    record = write_record(silo.ledger, TransitionRelease(
        run_id=str(run_id), silo=data.name, round=int(server_round), platform=held, pairs=len(cand[0]),
        max_pairs=int(cfg.transition_max_pairs), noise_multiplier=float(state.transition_noise_multiplier),
        sensitivity=sensitivity(cfg.transition_max_pairs), delta=float(state.delta), accountant=state.accountant,
        epsilon_release=float(eps_release), epsilon_cumulative=float(state.epsilon_spent),
        epsilon_budget=float(state.epsilon_budget), users=len(users), time=_now()))
    std = state.transition_noise_multiplier * sensitivity(cfg.transition_max_pairs)
    log.info("silo %s: released transition counts of %d users over %d candidate pairs (noise std %.3g, ε of the "
             "release alone %.4g)", data.name, len(users), len(cand[0]), std, eps_release)
    return TransitionReply("released", info, noisy, noise_std=std, privacy=state, records=[record])
