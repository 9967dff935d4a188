"""The server's side of the popularity prior: ask every silo for its release, sum the
releases per platform, and build the log prior the model scores with.

:func:`collect_prior` sends ``query.popularity`` to every connected silo before the first
round, records each reply (``metrics.json`` rows of phase ``popularity``; the silo's
``popularity-release`` or ``plain-release`` record on the federation ledger) and sums the
counts of the silos of each platform. The noise of a sum is public (each silo's std is
z·√c, the mechanism's parameters), so the threshold of :func:`shared_model.popularity.log_prior`
is post-processing. A platform with no release gets no prior (0 for its items). The summed
releases and each node's platform are kept for the transition release's candidate pairs
(:mod:`fl_server.transitions`).

The counts travel in the clear: each is already differentially private (or, with
``dp = false``, the run is not private and the silo declares them outside ε). The summed
summary goes to ``metrics.json`` (``run.popularity``); the prior travels with every
later message (``popularity`` record) and with every checkpoint (the popularity_prior buffer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fl_server.records import RunRecords
from shared_model.config import RunConfig
from shared_model.popularity import log_prior, prior_vector
from shared_model.schema import Catalogue

@dataclass
class CollectedPrior:
    """What :func:`collect_prior` gathered: the ``prior`` over the catalogue, the ``summary``
    for ``metrics.json``, each platform's summed releases ``sums`` (over its catalogue items,
    in catalogue order; DP, so what is derived from them is post-processing) and each replying
    node's platform ``platform_of`` (public: every reply names it)."""

    prior: np.ndarray
    summary: dict[str, Any]
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    platform_of: dict[int, tuple[str, ...]] = field(default_factory=dict)


def reply_platforms(info: dict[str, Any]) -> tuple[str, ...]:
    """The platforms a silo's reply names (``info["platform"]``: one, or a region silo's
    several, comma-separated)."""
    return tuple(p for p in str(info.get("platform", "")).split(",") if p)


def prior_record(prior: np.ndarray) -> ArrayRecord:
    """The prior as the :data:`shared_model.popularity.PRIOR_RECORD` record of a message: ``log-prior`` over the catalogue."""
    return ArrayRecord({"log-prior": Array(np.asarray(prior, dtype=np.float32))})


def collect_prior(grid: Grid, cfg: RunConfig, catalogue: Catalogue, records: RunRecords,
                  append_ledger: Callable[[ConfigRecord, int], None], min_nodes: int,
                  timeout: float = 3600.0) -> CollectedPrior:
    """Ask every silo for its popularity release; the prior over the catalogue, its summary, the sums."""
    sample_nodes(grid, min_nodes, min_nodes)  # waits until min-nodes silos are connected
    nodes = sorted(grid.get_node_ids())
    messages = [grid.create_message(RecordDict({"config": ConfigRecord({"server-round": 0})}), "query.popularity",
                                    node, "0") for node in nodes]
    sums: dict[str, np.ndarray] = {}
    variance: dict[str, float] = {}
    silos: dict[str, list[str]] = {}
    platform_of: dict[int, tuple[str, ...]] = {}
    released = refused = failed = 0
    for msg in grid.send_and_receive(messages, timeout=timeout):
        node = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "popularity: node %d failed: %s", node, msg.error.reason)
            records.problem(0, "popularity", "?", node, "error", str(msg.error.reason))
            failed += 1
            continue
        info = dict(msg.content["info"])
        status = dict(msg.content["status"])
        silo, platforms = str(info.get("silo", "?")), reply_platforms(info)
        known = bool(platforms) and all(p in catalogue.platforms for p in platforms)
        if known:
            platform_of[node] = platforms
        metrics = dict(msg.content["metrics"])
        records.add(0, "popularity", silo, node, {**metrics, "status": str(status.get("status", ""))})
        for key in sorted(k for k in msg.content.keys() if k == "ledger" or k.startswith("ledger-")):
            append_ledger(msg.content[key], node)
        if "counts" not in msg.content:
            log(INFO, "popularity: silo %s released nothing: %s", silo, status.get("reason", "no reason given"))
            records.problem(0, "popularity", silo, node, "declined", str(status.get("reason", "")))
            refused += 1
            continue
        counts = msg.content["counts"]["counts"].numpy().astype(np.float64)
        sizes = [len(catalogue.platform_item_ids(p)) for p in platforms] if known else []
        expected = sum(sizes) if known else -1
        std = float(metrics.get("noise-std", 0.0))
        if len(counts) != expected or not np.all(np.isfinite(counts)) or not (math.isfinite(std) and std >= 0):
            reason = (f"sent {len(counts)} counts for platform {','.join(platforms)!r} ({expected} catalogue items)"
                      if len(counts) != expected else "non-finite counts or noise std")
            log(WARNING, "popularity: refusing silo %s's release: %s", silo, reason)
            records.problem(0, "popularity", silo, node, "refused", reason)
            failed += 1
            continue
        for platform, part in zip(platforms, np.split(counts, np.cumsum(sizes)[:-1])):
            sums[platform] = sums.get(platform, np.zeros_like(part)) + part
            variance[platform] = variance.get(platform, 0.0) + std**2
            silos.setdefault(platform, []).append(silo)
        released += 1
    records.outcome(0, "popularity", released, failed, refused)
    priors = {p: log_prior(sums[p], math.sqrt(variance[p]), cfg.popularity_threshold) for p in sums}
    summary = {p: {"silos": sorted(silos[p]), "noise-std": math.sqrt(variance[p]), "items": len(sums[p]),
                   "items-above-threshold": int(np.sum(sums[p] > cfg.popularity_threshold * math.sqrt(variance[p])))}
               for p in sums}
    for p, s in summary.items():
        log(INFO, "popularity: platform %s: releases of %s summed (noise std %.3g); %d of %d items above %g std",
            p, ", ".join(s["silos"]), s["noise-std"], s["items-above-threshold"], s["items"], cfg.popularity_threshold)
    return CollectedPrior(prior_vector(catalogue, priors), {"platforms": summary, "threshold": cfg.popularity_threshold,
                                                           "max-items": cfg.popularity_max_items}, sums, platform_of)
