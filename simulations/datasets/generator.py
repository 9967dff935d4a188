"""Planted-migration generator: synthetic shoppers written in the fedshift dataset format.

Users ``u00000…`` are spread round-robin over R regions; every user shops on every one of
P platforms (``p0``, ``p1``, …), so there are P × R silos named ``<platform>-r<region>``.
On a platform a user follows a ground-truth category trajectory: a random start category,
and before each later history event a switch to another category with ``switch_prob``
(the switch points are recorded). Each event is an item of the current category; history
events are views or carts with probability ``view_rate`` (half each), else purchases.

The next event (the user's last event on the silo) plants migration: in each silo exactly
``round(migration_rate × users)`` users, drawn at random, get a next item from a category
not among the categories of their last ``k`` history events; all others continue in the
category of their last history event. So the migration definition of
:mod:`shared_model.examples` recovers the planted flag for every user. The ground truth is
written to ``truth.csv`` at the dataset root (never read by silos) and returned.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from shared_model.dataset import PATH_SEPARATOR
from shared_model.io_utils import write_bytes_atomic, write_csv

ADJECTIVES = ("bright", "classic", "compact", "deluxe", "eco", "giant", "handy", "mini", "modern", "pro",
              "quiet", "rapid", "royal", "smart", "soft", "sturdy", "travel", "vintage", "wild", "zen")
NOUNS = ("paints", "brushes", "yarn", "beads", "paper", "markers", "tape", "folders", "lamps", "chairs",
         "pens", "stamps", "fabric", "clay", "ink", "labels", "binders", "frames", "glue", "scissors",
         "canvas", "thread", "desks", "cables", "phones", "planners", "stickers", "ribbons", "molds", "kits")
KINDS = ("basic", "premium")
BRANDS = ("acme", "northwind", "contoso", "fabrikam", "globex", "initech", "umbrella", "vandelay")


def _category_names(n: int, rng: random.Random) -> list[str]:
    pairs = [f"{a} {b}" for a in ADJECTIVES for b in NOUNS]
    if n > len(pairs):
        pairs += [f"group {i}" for i in range(n - len(pairs))]
    return rng.sample(pairs, n)


def generate(
    out_dir: Path,
    users: int = 200,
    platforms: int = 2,
    regions: int = 2,
    migration_rate: float = 0.3,
    categories_per_platform: int = 8,
    items_per_category: int = 20,
    seed: int = 0,
    min_history: int = 3,
    max_history: int = 12,
    switch_prob: float = 0.2,
    view_rate: float = 0.2,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    k: int = 5,
    compress: bool = False,
) -> dict[str, dict[str, bool]]:
    """Write a synthetic dataset to ``out_dir``; returns the planted flag per silo and user.

    ``users`` is the total number of users (each shops on every platform, in one region);
    history lengths (before the next event) are uniform in [min_history, max_history].
    """
    if not (0.0 <= migration_rate <= 1.0):
        raise ValueError("migration_rate must be in [0, 1]")
    if migration_rate > 0 and categories_per_platform <= k:
        raise ValueError(f"categories_per_platform must exceed k={k} to plant migration")
    if categories_per_platform < 2 or items_per_category < 1 or not 1 <= min_history <= max_history:
        raise ValueError("need categories_per_platform >= 2, items_per_category >= 1, 1 <= min_history <= max_history")
    if users < regions or platforms < 1 or regions < 1:
        raise ValueError("need platforms >= 1, regions >= 1 and users >= regions")
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    ext = ".csv.gz" if compress else ".csv"
    plats = [f"p{i}" for i in range(platforms)]

    # Catalogue: platform -> category index -> item ids.
    item_rows: list[tuple[str, str, str, str, str]] = []
    cat_items: dict[str, list[list[str]]] = {}
    cat_names: dict[str, list[str]] = {}
    for p in plats:
        names = _category_names(categories_per_platform, rng)
        cat_names[p] = names
        cat_items[p] = []
        for c, name in enumerate(names):
            ids = []
            for j in range(items_per_category):
                iid = f"{p}c{c:03d}i{j:04d}"
                kind = KINDS[j % len(KINDS)]
                brand = BRANDS[rng.randrange(len(BRANDS))]
                title = f"{brand} {ADJECTIVES[rng.randrange(len(ADJECTIVES))]} {name.split()[-1]} {kind} {j}"
                item_rows.append((iid, p, title, PATH_SEPARATOR.join((f"platform {p}", name, f"{name} {kind}")), brand))
                ids.append(iid)
            cat_items[p].append(ids)

    user_ids = [f"u{i:05d}" for i in range(users)]
    truth: dict[str, dict[str, bool]] = {}
    truth_rows: list[tuple[str, str, str, int, str, str]] = []
    n_cat = categories_per_platform
    for p in plats:
        for r in range(regions):
            silo = f"{p}-r{r}"
            members = user_ids[r::regions]
            order = members[:]
            rng.shuffle(order)
            n_valid, n_test = round(valid_frac * len(order)), round(test_frac * len(order))
            split = {u: "valid" for u in order[:n_valid]} | {u: "test" for u in order[n_valid:n_valid + n_test]}
            migrants = set(rng.sample(members, round(migration_rate * len(members))))
            events: list[tuple[str, str, int, str]] = []
            truth[silo] = {}
            for u in members:
                length = rng.randint(min_history, max_history)
                cat = rng.randrange(n_cat)
                cats, switches = [], []
                for pos in range(length):
                    if pos and rng.random() < switch_prob:
                        cat = (cat + rng.randrange(1, n_cat)) % n_cat
                        switches.append(pos)
                    cats.append(cat)
                    roll = rng.random()
                    etype = "purchase" if roll >= view_rate else ("view" if roll < view_rate / 2 else "cart")
                    events.append((u, rng.choice(cat_items[p][cat]), pos, etype))
                migrating = u in migrants
                if migrating:
                    recent = set(cats[-k:])
                    nxt = rng.choice([c for c in range(n_cat) if c not in recent])
                    switches.append(length)
                else:
                    nxt = cats[-1]
                events.append((u, rng.choice(cat_items[p][nxt]), length, "purchase"))
                truth[silo][u] = migrating
                truth_rows.append((silo, u, split.get(u, "train"), int(migrating),
                                   " ".join(str(x) for x in switches), " ".join(str(c) for c in cats + [nxt])))
            write_csv(out_dir / "silos" / silo / f"users{ext}", ("user_id", "split"),
                      sorted((u, split.get(u, "train")) for u in members))
            write_csv(out_dir / "silos" / silo / f"events{ext}", ("user_id", "item_id", "order", "event_type"), events)

    write_csv(out_dir / f"items{ext}", ("item_id", "platform", "title", "category_path", "brand"), item_rows)
    write_csv(out_dir / "truth.csv", ("silo", "user_id", "split", "migrating", "switch_points", "category_trajectory"),
              truth_rows)
    info = {
        "name": out_dir.name,
        "platforms": plats,
        "regions": regions,
        "source": "synthetic: simulations.datasets.generator (planted interest migration)",
        "interest_level": 2,
        "migration_k": k,
        "format_version": 1,
        "generator": {"users": users, "platforms": platforms, "regions": regions, "migration_rate": migration_rate,
                      "categories_per_platform": categories_per_platform, "items_per_category": items_per_category,
                      "seed": seed, "min_history": min_history, "max_history": max_history,
                      "switch_prob": switch_prob, "view_rate": view_rate},
    }
    write_bytes_atomic(out_dir / "dataset.json", (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return truth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m simulations.datasets.generator",
        description="Write a synthetic fedshift dataset with planted interest migration: PLATFORMS x REGIONS "
                    "silos, generated items per category, a ground-truth category trajectory per user, and "
                    "truth.csv with the planted migration flag of every user's next event.",
    )
    p.add_argument("out_dir", type=Path, help="dataset folder to write")
    p.add_argument("--users", type=int, default=200, help="total users, spread round-robin over regions (default 200)")
    p.add_argument("--platforms", type=int, default=2, help="number of platforms (default 2)")
    p.add_argument("--regions", type=int, default=2, help="regions per platform (default 2)")
    p.add_argument("--migration-rate", type=float, default=0.3, help="share of users whose next event migrates (default 0.3)")
    p.add_argument("--categories", type=int, default=8, help="level-2 categories per platform (default 8)")
    p.add_argument("--items-per-category", type=int, default=20, help="items per category (default 20)")
    p.add_argument("--min-history", type=int, default=3, help="shortest history before the next event (default 3)")
    p.add_argument("--max-history", type=int, default=12, help="longest history before the next event (default 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--gzip", action="store_true", help="write .csv.gz files")
    a = p.parse_args(argv)
    truth = generate(a.out_dir, users=a.users, platforms=a.platforms, regions=a.regions,
                     migration_rate=a.migration_rate, categories_per_platform=a.categories,
                     items_per_category=a.items_per_category, seed=a.seed, min_history=a.min_history,
                     max_history=a.max_history, compress=a.gzip)
    n = sum(len(t) for t in truth.values())
    print(f"{a.out_dir}: {len(truth)} silos, {n} user-silo histories, "
          f"{sum(sum(t.values()) for t in truth.values())} planted migrations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
