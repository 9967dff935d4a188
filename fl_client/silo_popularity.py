"""The silo's popularity release (``popularity-prior``): a Gaussian histogram of its training
users' items, composed in the silo's own accountant and written to its ledger.

:func:`release_popularity` counts each training user's ``popularity-max-items`` most recent
distinct items over the silo's platform catalogue (a region silo: its platforms' catalogues,
concatenated in its platform order, c items per user over all of them) (:mod:`shared_model.popularity`), adds
Gaussian noise of multiplier z (calibrated with the run: :meth:`PrivacyState.calibrate`) from
the silo's secret randomness, and writes a ``popularity-release`` record. The release is
refused (nothing leaves) when it would exceed the run or lifetime budget, or when the silo
has already released for this run (a second release would spend ε again for nothing).

With ``dp = false`` (a non-private run) the exact counts leave, declared outside ε by a
``plain-release`` record, like every other number of such a run.
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
from shared_model.popularity import item_counts, noisy_counts, sensitivity
from shared_model.privacy import budget
from shared_model.privacy.records import PlainRelease, PopularityRelease, of_run, read_records, write_record
from shared_model.privacy.silo_secret import derive_seed
from shared_model.privacy.state import PrivacyState

log = logging.getLogger("fedshift.client")


@dataclass
class PopularityReply:
    status: str  # "released" | "refused" | "exact" (dp = false)
    info: dict[str, str]
    counts: np.ndarray | None = None  # over the silo's platforms' catalogue items, platform by platform
    noise_std: float = 0.0  # standard deviation of each count's noise (public: z·√c)
    reason: str = ""
    privacy: PrivacyState | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


def refused_popularity(gate: Gate) -> PopularityReply:
    """The policy refused the request: release nothing (the train round records the refusal)."""
    assert gate.refusal is not None
    return PopularityReply("refused", {"silo": gate.silo}, reason=gate.refusal.reason)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def release_popularity(silo: SiloSetup, run_id: int | str, privacy: PrivacyState | None = None,
                       server_round: int = 0) -> PopularityReply:
    """The silo's item histogram as its policy and budget allow (see the module docstring)."""
    cfg, data = silo.cfg, silo.data
    info = {**silo.info, "max-items": str(cfg.popularity_max_items)}
    users = train_user_ids(data.silo)
    item_ids = [i for p in data.platforms for i in data.catalogue.platform_item_ids(p)]
    held = ",".join(data.platforms)
    counts = item_counts(data.silo, users, item_ids, cfg.popularity_max_items)
    if not cfg.dp:
        record = write_record(silo.ledger, PlainRelease(
            run_id=str(run_id), silo=data.name, round=int(server_round), phase="popularity",
            names=f"item-counts ({len(item_ids)} items of {held}, ≤{cfg.popularity_max_items} per user)",
            policy="dp = false (a non-private run)", time=_now()))
        return PopularityReply("exact", info, counts, 0.0, records=[record])
    state = privacy_for(silo, run_id, privacy)
    if state.popularity_noise_multiplier <= 0:
        return PopularityReply("refused", info, reason="this run planned no popularity release", privacy=state)
    records = read_records(silo.ledger)
    if of_run([r for r in records if isinstance(r, PopularityRelease)], run_id, data.name):
        return PopularityReply("refused", info, reason=f"silo {data.name} already released its item counts for run "
                               f"{run_id}", privacy=state)
    entry = (state.popularity_noise_multiplier, 1.0, 1)
    refusal = budget.check_entry(state, entry, "the popularity release", silo.lifetime_cap, records, silo.ledger.path)
    if refusal is not None:
        log.warning("silo %s: popularity release withheld: %s", data.name, refusal.reason)
        return PopularityReply("refused", info, reason=refusal.reason, privacy=state)
    seed = derive_seed(silo.secret, run_id, data.name, server_round, "popularity")
    noisy = noisy_counts(counts, state.popularity_noise_multiplier, cfg.popularity_max_items, seed)
    eps_release = state.epsilon_of([entry])
    state.record_popularity()
    record = write_record(silo.ledger, PopularityRelease(
        run_id=str(run_id), silo=data.name, round=int(server_round), platform=held, items=len(item_ids),
        max_items=int(cfg.popularity_max_items), noise_multiplier=float(state.popularity_noise_multiplier),
        sensitivity=sensitivity(cfg.popularity_max_items), delta=float(state.delta), accountant=state.accountant,
        epsilon_release=float(eps_release), epsilon_cumulative=float(state.epsilon_spent),
        epsilon_budget=float(state.epsilon_budget), users=len(users), time=_now()))
    std = state.popularity_noise_multiplier * sensitivity(cfg.popularity_max_items)
    log.info("silo %s: released item counts of %d users over %d items (noise std %.3g, ε of the release alone %.4g)",
             data.name, len(users), len(item_ids), std, eps_release)
    return PopularityReply("released", info, noisy, std, privacy=state, records=[record])
