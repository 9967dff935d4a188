"""How well interests derived from titles alone recover a dataset's real category levels.

For each platform: the interests derived from the titles-only version of the catalogue
(:mod:`shared_model.derived_interests`, the same classes a titles-only copy made by
:mod:`simulations.datasets.titles_only` gets) against the real classes at levels 2 and 3, over
the items labelled at that level: adjusted Rand index and purity
(:mod:`shared_model.cluster_agreement`). Prints a Markdown table (docs/interests.md).

    python -m simulations.datasets.interest_agreement data/amazon-art-office
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from shared_model.cluster_agreement import adjusted_rand_index, purity
from shared_model.dataset import read_catalogue
from shared_model.derived_interests import derive_platform
from shared_model.schema import Catalogue


def titles_only(catalogue: Catalogue) -> Catalogue:
    """The catalogue with every category path dropped (what a titles-only copy reads)."""
    return Catalogue({i: replace(it, categories=()) for i, it in catalogue.items.items()}, catalogue.platforms)


def agreement(dataset: Path, base_model: str | None = None, max_tokens: int = 32, seed: int = 0,
              levels: tuple[int, ...] = (2, 3)) -> list[dict]:
    """One row per (platform, level): items compared, classes on each side, ARI and purity."""
    real = read_catalogue(dataset)
    bare = titles_only(real)
    rows = []
    for plat in real.platforms:
        derived, meta = derive_platform(bare, plat, base_model, max_tokens, seed)
        for level in levels:
            ids = [i for i in real.platform_item_ids(plat) if real.items[i].path_label(level) is not None]
            truth = [real.items[i].path_label(level) for i in ids]
            pred = [derived[i] for i in ids]
            rows.append({"platform": plat, "level": level, "items": len(ids), "real_classes": len(set(truth)),
                         "derived_classes": len(set(pred)), "k": meta["k"], "seed": seed,
                         "ari": adjusted_rand_index(truth, pred), "purity": purity(truth, pred)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.datasets.interest_agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="dataset folder with category paths")
    p.add_argument("--base-model", default="", help="BERT folder (default: the bundled encoder)")
    p.add_argument("--max-tokens", type=int, default=32, help="item text token budget (default 32)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0, as dataset.json's interest_seed)")
    a = p.parse_args(argv)
    print("| platform | level | items | real classes | derived classes | ARI | purity |")
    print("|---|---|---|---|---|---|---|")
    for r in agreement(a.dataset, a.base_model or None, a.max_tokens, a.seed):
        print(f"| {r['platform']} | {r['level']} | {r['items']} | {r['real_classes']} | {r['derived_classes']} "
              f"| {r['ari']:.3f} | {r['purity']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
