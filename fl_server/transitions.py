"""The server's side of the item-transition release: build each platform's public candidate
pairs, ask every silo for its release, sum the releases per platform into the transition table.

A region silo (several platforms) releases over its *pair spaces*
(:func:`shared_model.transitions.pair_spaces`): each platform's pairs and each two
platforms' cross pairs, concatenated in one release; the server splits it by space
(:func:`by_space`) and sums each space's releases from every silo that holds it.

:func:`platform_candidates` (DP runs) pairs each item of a platform with its
``transition-neighbours`` nearest items by cosine of the frozen base-encoder item vectors
(public), and with the platform's ``transition-popular`` most popular items by the summed DP
popularity release (post-processing of an earlier DP output; without one, neighbours only).

:func:`collect_transitions` sends ``query.transitions`` to every connected silo after the
popularity collection: its config names the platforms whose candidates it carries (the node's
own, known from its popularity reply, else every platform), the ``candidates`` record their
rows (int32 ``a-I``, ``b-I``). It records each reply (``metrics.json`` rows of phase
``transitions``; the silo's ``transition-release`` or ``plain-release`` record on the
federation ledger), refuses malformed releases (wrong length, non-finite, pairs off the
platform) and sums the releases of each platform (:func:`shared_model.transitions.sum_releases`:
summed noise std √Σ std², pairs ≤ ``transition-threshold`` std dropped, post-processing).

The table travels with every later message (:data:`~shared_model.transitions.TRANSITIONS_RECORD`,
:func:`table_record`) and with every checkpoint (in the model, when it has a ``transition_table``);
its summary goes to ``metrics.json`` ``run.transitions``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fl_server.popularity import CollectedPrior, reply_platforms
from fl_server.records import RunRecords
from shared_model.config import RunConfig
from shared_model.item_index import ItemIndex, build_item_index
from shared_model.schema import Catalogue
from shared_model.sequences import row_platforms
from shared_model.transitions import (TransitionTable, candidate_pairs, cross_candidate_pairs, pair_spaces,
                                      popular_rows, query_problem, sum_releases)

Pairs = tuple[np.ndarray, np.ndarray]


def table_record(table: TransitionTable) -> ArrayRecord:
    """The table as the :data:`~shared_model.transitions.TRANSITIONS_RECORD` record of a message."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in table.arrays().items()})


def set_model_table(model: object, table: TransitionTable) -> None:
    """Put ``table`` into ``model`` when it has a ``transition_table`` (else nothing)."""
    if getattr(model, "transition_table", None) is not None:
        model.transition_table.set_table(table)  # type: ignore[attr-defined]


def model_table(model: object) -> TransitionTable | None:
    """The table ``model`` holds (a checkpoint's, on resume: the ``a``, ``b``, ``counts`` buffers
    of its ``transition_table``), or None when it has no ``transition_table``."""
    module = getattr(model, "transition_table", None)
    if module is None:
        return None
    return TransitionTable.from_arrays({k: getattr(module, k).detach().cpu().numpy() for k in ("a", "b", "counts")})


def platform_candidates(cfg: RunConfig, catalogue: Catalogue, index: ItemIndex,
                        popularity: Mapping[str, np.ndarray] | None = None,
                        spaces: Sequence[str] | None = None) -> dict[str, Pairs]:
    """Each pair space's candidate pairs (see the module docstring): each platform's, and
    each ``"a|b"`` cross space among ``spaces`` (default: the platforms only);
    ``popularity``: each platform's summed popularity release over its catalogue items."""
    if index.item_ids != list(catalogue.items):
        raise ValueError("the item index's rows are not this catalogue's items (another catalogue's index)")
    rows = catalogue_rows(catalogue)
    popular = {p: popular_rows(popularity[p], r, cfg.transition_popular) if popularity and p in popularity
               else np.zeros(0, np.int64) for p, r in rows.items()}
    out: dict[str, Pairs] = {}
    for space in (spaces if spaces is not None else list(rows)):
        if "|" in space:
            a, b = space.split("|")
            out[space] = cross_candidate_pairs(index.embeddings, rows[a], rows[b], cfg.transition_neighbours,
                                               popular[a], popular[b])
        else:
            out[space] = candidate_pairs(index.embeddings, rows[space], cfg.transition_neighbours, popular[space])
    return out


def concatenated(spaces: Sequence[str], candidates: Mapping[str, Pairs]) -> Pairs | None:
    """The candidate pairs of ``spaces`` one after another (a region silo's one release), or
    None when one of them has none."""
    if not spaces or any(s not in candidates for s in spaces):
        return None
    return (np.concatenate([candidates[s][0] for s in spaces]), np.concatenate([candidates[s][1] for s in spaces]))


def query_content(spaces: list[str], candidates: Mapping[str, Pairs]) -> RecordDict:
    """A ``query.transitions`` message: its config's ``spaces`` names the pair spaces (a
    platform, or two platforms' cross pairs ``"a|b"``) whose candidates ``a-I``, ``b-I`` it carries."""
    content = RecordDict({"config": ConfigRecord({"server-round": 0, "spaces": list(spaces)})})
    arrays = {}
    for i, p in enumerate(spaces):
        if p in candidates:
            arrays[f"a-{i}"] = Array(candidates[p][0].astype(np.int32))
            arrays[f"b-{i}"] = Array(candidates[p][1].astype(np.int32))
    if arrays:
        content["candidates"] = ArrayRecord(arrays)
    return content


def catalogue_platforms(catalogue: Catalogue) -> np.ndarray:
    """``[N]`` each catalogue row's platform (its index in ``catalogue.platforms``; rows are
    positions in the catalogue = the item index's rows)."""
    return row_platforms(catalogue, list(catalogue.items)).numpy()


def catalogue_rows(catalogue: Catalogue, item_platform: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each platform's item rows (from :func:`catalogue_platforms`, or ``item_platform`` if given)."""
    plat = catalogue_platforms(catalogue) if item_platform is None else item_platform
    return {p: np.flatnonzero(plat == i).astype(np.int64) for i, p in enumerate(catalogue.platforms)}


def release_problem(cfg: RunConfig, content: RecordDict, expected: Pairs | None, platform_rows: np.ndarray,
                    num_items: int) -> tuple[str | None, Pairs | None]:
    """Why a reply's release is refused (or None) and the pairs its counts are for: in a DP
    run exactly one finite count per candidate pair sent, and the noise std the reply states
    equal to its ``transition-release`` record's z·√m (the threshold trusts it); otherwise
    sparse exact counts (``a``, ``b``, ``counts``) of pairs of the platform, finite and ≥ 0."""
    rec = content["counts"]
    counts = rec["counts"].numpy() if "counts" in rec else np.zeros(0)
    std = float(content["metrics"].get("noise-std", 0.0)) if "metrics" in content else 0.0
    if not (math.isfinite(std) and std >= 0) or not np.all(np.isfinite(counts)):
        return "non-finite counts or noise std", None
    if cfg.dp:
        if expected is None:
            return "released counts but was sent no candidate pairs", None
        if counts.ndim != 1 or len(counts) != len(expected[0]):
            return f"sent {counts.size} counts for {len(expected[0])} candidate pairs", None
        record = next((content[k] for k in content.keys() if (k == "ledger" or k.startswith("ledger-"))
                       and content[k].get("kind") == "transition-release"), None)
        if record is None:
            return "noisy counts without their transition-release ledger record", None
        declared = float(record["noise-multiplier"]) * float(record["sensitivity"])  # type: ignore[arg-type]
        if not math.isclose(declared, std, rel_tol=1e-6):
            return f"noise std {std:g}, but its ledger record declares z·√m = {declared:g}", None
        return None, expected
    if "a" not in rec or "b" not in rec:
        return "exact counts without their pairs (a, b)", None
    a, b = rec["a"].numpy(), rec["b"].numpy()
    n = len(platform_rows)
    problem = query_problem(a, b, platform_rows, num_items, n * (n - 1) // 2)
    if problem is None and (counts.shape != a.shape or np.any(counts < 0)):
        problem = f"{counts.size} counts for {a.size} pairs, or negative counts"
    return problem, None if problem else (a.astype(np.int64), b.astype(np.int64))


def collect_transitions(grid: Grid, cfg: RunConfig, catalogue: Catalogue, records: RunRecords,
                        append_ledger: Callable[[ConfigRecord, int], None], min_nodes: int,
                        popularity: CollectedPrior | None = None, index: ItemIndex | None = None,
                        timeout: float = 3600.0) -> tuple[TransitionTable, dict[str, Any]]:
    """Ask every silo for its transition release; ``(the summed, thresholded table, summary)``."""
    sample_nodes(grid, min_nodes, min_nodes)  # waits until min-nodes silos are connected
    nodes = sorted(grid.get_node_ids())
    started = time.time()
    if cfg.dp and index is None:  # the candidates' text neighbours (a non-private run needs none)
        index = build_item_index(catalogue, cfg.base_model or None, cfg.max_item_tokens)
    platform_of = popularity.platform_of if popularity else {}
    # a node's pair spaces: its platforms' (known from its popularity reply), else every platform's
    # own (a node of unknown platforms could be a region silo: then it is sent every cross space too)
    node_spaces = {n: tuple(pair_spaces(platform_of[n])) if n in platform_of else
                   tuple(pair_spaces(catalogue.platforms)) for n in nodes}
    wanted = [s for s in pair_spaces(catalogue.platforms) if any(s in v for v in node_spaces.values())]
    candidates = platform_candidates(cfg, catalogue, index, popularity.sums if popularity else None, wanted) \
        if cfg.dp and index is not None else {}
    seconds = time.time() - started
    item_platform = catalogue_platforms(catalogue)
    rows, num_items = catalogue_rows(catalogue, item_platform), len(catalogue.items)
    queries: dict[tuple[str, ...], RecordDict] = {}  # one per set of spaces
    for n in nodes:
        if node_spaces[n] not in queries:
            queries[node_spaces[n]] = query_content(list(node_spaces[n]), candidates)
    messages = [grid.create_message(queries[node_spaces[n]], "query.transitions", n, "0") for n in nodes]
    releases: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]] = {}
    silos: dict[str, list[str]] = {}
    released = refused = failed = 0
    for msg in grid.send_and_receive(messages, timeout=timeout):
        node = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "transitions: node %d failed: %s", node, msg.error.reason)
            records.problem(0, "transitions", "?", node, "error", str(msg.error.reason))
            failed += 1
            continue
        info, status = dict(msg.content["info"]), dict(msg.content["status"])
        silo, platforms = str(info.get("silo", "?")), reply_platforms(info)
        metrics = dict(msg.content["metrics"])
        records.add(0, "transitions", silo, node, {**metrics, "status": str(status.get("status", ""))})
        for key in sorted(k for k in msg.content.keys() if k == "ledger" or k.startswith("ledger-")):
            append_ledger(msg.content[key], node)
        if "counts" not in msg.content:
            log(INFO, "transitions: silo %s released nothing: %s", silo, status.get("reason", "no reason given"))
            records.problem(0, "transitions", silo, node, "declined", str(status.get("reason", "")))
            refused += 1
            continue
        spaces = pair_spaces(platforms)
        if not platforms or any(p not in catalogue.platforms for p in platforms):
            problem, pairs = f"unknown platform {','.join(platforms)!r}", None
        else:
            held = np.sort(np.concatenate([rows[p] for p in platforms]))
            problem, pairs = release_problem(cfg, msg.content, concatenated(spaces, candidates), held, num_items)
        if problem is not None or pairs is None:
            log(WARNING, "transitions: refusing silo %s's release: %s", silo, problem)
            records.problem(0, "transitions", silo, node, "refused", str(problem))
            failed += 1
            continue
        counts = msg.content["counts"]["counts"].numpy().astype(np.float64)
        std = float(metrics.get("noise-std", 0.0))
        for space, (a, b, c) in by_space(pairs, counts, spaces, candidates if cfg.dp else None, item_platform,
                                        catalogue.platforms).items():
            releases.setdefault(space, []).append((a, b, c, std))
            silos.setdefault(space, []).append(silo)
        released += 1
    records.outcome(0, "transitions", released, failed, refused)
    tables, summary = [], {}
    for p in sorted(releases, key=pair_spaces(catalogue.platforms).index):
        table, std, summed = sum_releases(releases[p], cfg.transition_threshold, num_items)
        tables.append(table)
        summary[p] = {"silos": sorted(silos[p]), "noise-std": std, "candidate-pairs": len(candidates[p][0])
                      if p in candidates else None, "pairs-summed": summed, "pairs-kept": len(table)}
        log(INFO, "transitions: platform %s: releases of %s summed (noise std %.3g); %d of %d pairs kept (sum > %g "
            "× noise std, and > 0)", p, ", ".join(summary[p]["silos"]), std, len(table), summed,
            cfg.transition_threshold)
    return merge_tables(tables, num_items), {
        "platforms": summary, "threshold": cfg.transition_threshold, "max-pairs": cfg.transition_max_pairs,
        "neighbours": cfg.transition_neighbours, "popular": cfg.transition_popular,
        "candidate-seconds": round(seconds, 2)}


def by_space(pairs: Pairs, counts: np.ndarray, spaces: Sequence[str], candidates: Mapping[str, Pairs] | None,
             item_platform: np.ndarray, platforms: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A release's ``(a, b, counts)`` split by pair space: a DP release in blocks of the spaces'
    candidates (``candidates``), in order; exact counts (``candidates`` None) by each pair's
    items' platforms (``item_platform``: each row's index in ``platforms``)."""
    if candidates is not None:
        ends = np.cumsum([len(candidates[s][0]) for s in spaces])[:-1]
        return {s: (a, b, c) for s, a, b, c in zip(spaces, np.split(pairs[0], ends), np.split(pairs[1], ends),
                                                   np.split(counts, ends))}
    pa, pb = item_platform[pairs[0]], item_platform[pairs[1]]
    out = {}
    for s in spaces:
        x, _, y = s.partition("|")
        ia, ib = list(platforms).index(x), list(platforms).index(y or x)
        keep = ((pa == ia) & (pb == ib)) | ((pa == ib) & (pb == ia))
        if keep.any():
            out[s] = (pairs[0][keep], pairs[1][keep], counts[keep])
    return out


def merge_tables(tables: list[TransitionTable], num_items: int) -> TransitionTable:
    """The platforms' tables (disjoint pairs) as one, sorted by (a, b)."""
    if not tables:
        return TransitionTable.empty()
    a, b, c = (np.concatenate([getattr(t, k) for t in tables]) for k in ("a", "b", "counts"))
    order = np.argsort(a * np.int64(num_items) + b, kind="stable")
    return TransitionTable(a[order], b[order], c[order])
