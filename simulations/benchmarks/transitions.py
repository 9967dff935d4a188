"""Figures of the DP item-transition release on a dataset (docs/transitions.md): pairs per
platform, the candidate set's size, coverage and the server's time to build it, message
sizes, the calibrated noise and the pairs a release keeps after the threshold.

    python -m simulations.benchmarks.transitions [--dataset DIR] [--base-model DIR] [--json]

Everything runs as the run would, without Flower: the silos' training users' pairs
(:func:`shared_model.transitions.pair_counts`), the noise each silo calibrates for the
``quick`` preset (:meth:`PrivacyState.calibrate`), the summed DP popularity release that
selects the popular items (drawn with a fixed seed, as a silo would with its secret), and
:func:`fl_server.transitions.platform_candidates` on the cached base-encoder item index.
Coverage: the share of the pairs that the platform's training users show at least 3 (5)
times, summed over its silos, that the candidate set contains. Per threshold: the pairs a
release keeps, how many of them no training user has (kept by noise alone), and the number
pure noise would keep (candidates × P(N(0,1) > threshold)).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def measure(dataset: Path, base_model: str = "", settings: tuple[tuple[int, int], ...] = ((50, 100), (100, 200),
                                                                                           (50, 0), (100, 0)),
            thresholds: tuple[float, ...] = (3.0, 4.0, 5.0, 5.5), seed: int = 0) -> dict[str, Any]:
    import torch

    from fl_server.transitions import catalogue_rows, platform_candidates
    from shared_model.config import RunConfig
    from shared_model.dataset import list_silos, load_silo, read_catalogue
    from shared_model.examples import train_user_ids
    from shared_model.item_index import build_item_index
    from shared_model.popularity import item_counts, noisy_counts as noisy_items
    from shared_model.privacy.state import PrivacyState
    from shared_model.transitions import counts_over, noisy_counts, pair_counts, sum_releases

    cfg = RunConfig(dataset=str(dataset), base_model=base_model)
    catalogue = read_catalogue(dataset)
    index = build_item_index(catalogue, base_model or None, cfg.max_item_tokens)
    rows, n_items = catalogue_rows(catalogue), len(catalogue.items)
    silos = {name: load_silo(dataset / "silos" / name, catalogue) for name in list_silos(dataset)}
    rng_seed = iter(range(seed, seed + 10_000))
    out: dict[str, Any] = {"dataset": str(dataset), "torch-threads": torch.get_num_threads(), "platforms": {}}
    exact: dict[str, list] = {}
    popularity: dict[str, np.ndarray] = {}
    noise: dict[str, list[tuple[str, PrivacyState, int]]] = {}
    for name, silo in silos.items():
        users = train_user_ids(silo)
        state = PrivacyState.calibrate(name, cfg, num_users=len(users))
        noise.setdefault(silo.platform, []).append((name, state, len(users)))
        exact.setdefault(silo.platform, []).append(pair_counts(silo, users, index.row, cfg.transition_max_pairs))
        counts = item_counts(silo, users, catalogue.platform_item_ids(silo.platform), cfg.popularity_max_items)
        released = noisy_items(counts, state.popularity_noise_multiplier, cfg.popularity_max_items, next(rng_seed))
        popularity[silo.platform] = popularity.get(silo.platform, 0) + released
    tables = {p: sum_releases([(*x, 0.0) for x in pairs], 0.0, n_items)[0] for p, pairs in exact.items()}
    for platform, table in tables.items():
        out["platforms"][platform] = {
            "items": len(rows[platform]), "silos": [s for s, _, _ in noise[platform]],
            "training-users": sum(u for _, _, u in noise[platform]),
            "pairs-observed": len(table), "pairs-seen-3": int((table.counts >= 3).sum()),
            "pairs-seen-5": int((table.counts >= 5).sum()),
            "transition-noise-multiplier": [round(s.transition_noise_multiplier, 4) for _, s, _ in noise[platform]],
            "noise-std-summed": math.sqrt(sum((s.transition_noise_multiplier * math.sqrt(cfg.transition_max_pairs))
                                              ** 2 for _, s, _ in noise[platform])),
            "candidates": {}}
    for neighbours, popular in settings:
        c = replace(cfg, transition_neighbours=neighbours, transition_popular=popular)
        started = time.perf_counter()
        candidates = platform_candidates(c, catalogue, index, popularity)
        seconds = time.perf_counter() - started
        for platform, table in tables.items():
            entry = out["platforms"][platform]
            a, b = candidates[platform]
            covered = counts_over((table.a, table.b, table.counts), (a, b), n_items)
            entry["candidates"][f"{neighbours}+{popular}"] = {
                "pairs": len(a), "server-seconds-all-platforms": round(seconds, 2),
                "query-bytes": int(a.astype(np.int32).nbytes * 2), "reply-bytes": int(len(a) * 4),
                "coverage-seen-3": float((covered >= 3).sum() / max(entry["pairs-seen-3"], 1)),
                "coverage-seen-5": float((covered >= 5).sum() / max(entry["pairs-seen-5"], 1))}
            if (neighbours, popular) != (cfg.transition_neighbours, cfg.transition_popular):
                continue
            started = time.perf_counter()
            releases = [(a, b, noisy_counts(counts_over(p, (a, b), n_items), s.transition_noise_multiplier,
                                            cfg.transition_max_pairs, next(rng_seed)),
                         s.transition_noise_multiplier * math.sqrt(cfg.transition_max_pairs))
                        for p, (_, s, _) in zip(exact[platform], noise[platform])]
            silo_seconds = (time.perf_counter() - started) / len(releases)
            entry["release"] = {"silo-seconds": round(silo_seconds, 3), "by-threshold": {}}
            for threshold in thresholds:
                kept, _, _ = sum_releases(releases, threshold, n_items)
                true = counts_over((table.a, table.b, table.counts), (kept.a, kept.b), n_items)
                entry["release"]["by-threshold"][str(threshold)] = {
                    "pairs-kept": len(kept), "kept-never-observed": int((true == 0).sum()),
                    "kept-seen-3": int((true >= 3).sum()),
                    "noise-only-expected": len(a) * 0.5 * math.erfc(threshold / math.sqrt(2))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="", help="dataset folder (default: the bundled data)")
    p.add_argument("--base-model", default="", help="BERT folder (default: the bundled MiniLM)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from shared_model.config import RunConfig

    dataset = Path(args.dataset).resolve() if args.dataset else RunConfig().dataset_dir()
    result = measure(dataset, args.base_model)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for platform, e in result["platforms"].items():
        print(f"{platform}: {e['items']} items, {e['training-users']} training users on {', '.join(e['silos'])}; "
              f"{e['pairs-observed']} pairs observed, {e['pairs-seen-3']} seen ≥3, {e['pairs-seen-5']} seen ≥5; "
              f"z {e['transition-noise-multiplier']}, summed noise std {e['noise-std-summed']:.2f}")
        for key, c in e["candidates"].items():
            print(f"  neighbours+popular {key}: {c['pairs']} pairs, {c['server-seconds-all-platforms']} s (all "
                  f"platforms), query {c['query-bytes'] / 1e6:.1f} MB, reply {c['reply-bytes'] / 1e6:.1f} MB, "
                  f"coverage ≥3 {c['coverage-seen-3']:.1%}, ≥5 {c['coverage-seen-5']:.1%}")
        if "release" in e:
            print(f"  one DP release per silo (defaults): counting + noise {e['release']['silo-seconds']} s per silo")
            for t, r in e["release"]["by-threshold"].items():
                print(f"    threshold {t} std: {r['pairs-kept']} pairs kept, {r['kept-never-observed']} of them never "
                      f"observed (noise alone: {r['noise-only-expected']:.1f} expected), {r['kept-seen-3']} seen ≥3")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
