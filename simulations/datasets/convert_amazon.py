"""Convert the raw Amazon Arts–Office data (URLLM cut) into the fedshift dataset format.

Decisions (also in ``data/amazon-art-office/README.md``):

* Platforms: ``arts`` (raw platform A, item ids 0–18,638) and ``office`` (platform O, ids
  18,639–38,395). Item ids are the raw ``idAfter`` integers written as strings; a target's
  platform is decided by its id's platform, never by line order.
* Items: ``items.csv.gz`` sorted by integer id; ``category_path`` holds the levels recovered
  by :mod:`shared_model.categories` (roots ``arts crafts sewing`` / ``office products``
  given), joined by `` > ``; ``brand`` is the recovered brand.
* Users: ``user_id`` is the raw ``user_index``; the train/valid/test split is the raw file
  the user comes from. Region = ``int(sha256(reviewerID).hexdigest(), 16) % regions`` with
  the reviewer id from ``userlist.txt``; silos are ``<platform>-r<region>``.
* Events of a user on platform P: the history items of platform P in history order, then
  the user's next P item as the last event. ``order`` is the raw position in the interleaved
  two-platform history (the next item has position n). Every event is a review, written as
  the default event type (purchase), as usual for the Amazon review benchmarks.
* The next office item is the last token of the first line of a pair when it is an office
  id; for about 4 % of users it is a second arts item instead, which is dropped. Such users
  keep their office history in the office silo if they are train users; valid/test users
  without an office target are left out of the office silo (nothing to hold out), so the
  office test set matches the original benchmark's 950 users.
* A user appears in a silo only with at least one event there.
* ``dataset.json`` records each platform's interest level as the rule of
  :mod:`shared_model.interests` picks it from the written items (arts 2, office 3).
* **The regions layout** (``layouts/regions/``, a complete dataset folder of its own, chosen by
  ``--layout regions``): one silo per region, ``r<region>``, holding that region's users'
  events on both platforms (``silo.json`` declares them): the union of the user's events in
  ``arts-r<region>`` and ``office-r<region>``, same orders, same users, same splits. The two
  held-out next items share the order n (the events at a user's highest order are held out,
  one per platform), so each within-platform target is the platforms layout's. The catalogue
  file is the same bytes.
* Output is reproducible byte for byte: sorted rows, ``\\n`` line ends, gzip with mtime 0 and
  no embedded file name, every file written to a temp file and moved into place.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

from shared_model.categories import recover_platform
from shared_model.dataset import PATH_SEPARATOR
from shared_model.interests import rule_level
from shared_model.io_utils import write_bytes_atomic, write_csv
from shared_model.schema import Item

RAW_ITEM_FILES = {"arts": "item_listA_F.csv", "office": "item_listO_AA_F.csv"}
ROOTS = {"arts": "arts crafts sewing", "office": "office products"}
SPLIT_FILES = {"train": "train_F2.txt", "valid": "valid_F2.txt", "test": "test_F2.txt"}
PLATFORMS = ("arts", "office")


def region_of(reviewer_id: str, regions: int) -> int:
    """Stable region of a user: sha256 of the Amazon reviewer id, modulo ``regions``."""
    return int(hashlib.sha256(reviewer_id.encode("utf-8")).hexdigest(), 16) % regions


def _read_items(raw_dir: Path) -> tuple[list[tuple[int, str, str, str, str]], dict[int, str]]:
    """Catalogue rows ``(id, platform, title, category_path, brand)`` and id → platform."""
    rows: list[tuple[int, str, str, str, str]] = []
    platform_of: dict[int, str] = {}
    for plat in PLATFORMS:
        with open(raw_dir / RAW_ITEM_FILES[plat], encoding="utf-8", newline="") as f:
            raw = list(csv.DictReader(f))
        rec = recover_platform([(r["item_title"], r["item_attribute"]) for r in raw], root=ROOTS[plat])
        for r, c in zip(raw, rec):
            iid = int(r["idAfter"])
            if iid in platform_of:
                raise ValueError(f"{RAW_ITEM_FILES[plat]}: duplicate idAfter {iid}")
            platform_of[iid] = plat
            rows.append((iid, plat, " ".join(r["item_title"].split()), PATH_SEPARATOR.join(c.levels), c.brand))
    rows.sort()
    return rows, platform_of


def _parse_line(line: str, fname: str, lineno: int) -> tuple[str, list[tuple[int, int]], tuple[int, int]]:
    fields = [x for x in line.rstrip("\r\n").split("\t") if x != ""]
    uid, n = fields[0], int(fields[1])
    toks = [tuple(int(v) for v in t.split("|")[:2]) for t in fields[2:]]
    if len(toks) != n + 1:
        raise ValueError(f"{fname}:{lineno}: expected {n + 1} tokens, found {len(toks)}")
    return uid, toks[:n], toks[n]  # type: ignore[return-value]


def _read_users(raw_dir: Path) -> list[tuple[str, str, list[tuple[int, int]], tuple[int, int], tuple[int, int]]]:
    """``(user_index, split, history, last_of_line1, last_of_line2)`` for every user."""
    out = []
    for split, fname in SPLIT_FILES.items():
        with open(raw_dir / fname, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        if len(lines) % 2:
            raise ValueError(f"{fname}: odd number of lines")
        for i in range(0, len(lines), 2):
            u1, h1, t1 = _parse_line(lines[i], fname, i + 1)
            u2, h2, t2 = _parse_line(lines[i + 1], fname, i + 2)
            if u1 != u2 or h1 != h2:
                raise ValueError(f"{fname}:{i + 1}: the two lines of a user pair differ")
            out.append((u1, split, h1, t1, t2))
    return out


def convert(raw_dir: Path, out_dir: Path, regions: int = 2) -> dict[str, int]:
    """Write the dataset into ``out_dir``; returns users per silo."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if regions < 1:
        raise ValueError("regions must be >= 1")
    items, platform_of = _read_items(raw_dir)
    reviewer: dict[str, str] = {}
    with open(raw_dir / "userlist.txt", encoding="utf-8") as f:
        for ln in f:
            if ln.strip():
                rid, idx = ln.split()
                reviewer[idx] = rid

    silo_users: dict[str, list[tuple[int, str]]] = {}
    silo_events: dict[str, list[tuple[int, int, int]]] = {}
    for uid, split, hist, t1, t2 in _read_users(raw_dir):
        region = region_of(reviewer[uid], regions)
        nxt = {"arts": t2 if platform_of[t2[0]] == "arts" else None,
               "office": t1 if platform_of[t1[0]] == "office" else None}
        if nxt["arts"] is None:
            raise ValueError(f"user {uid}: second line's last item {t2[0]} is not an arts item")
        for plat in PLATFORMS:
            if nxt[plat] is None and split != "train":
                continue
            evs = [(iid, pos) for iid, pos in hist if platform_of[iid] == plat]
            if nxt[plat] is not None:
                evs.append(nxt[plat])
            if not evs:
                continue
            silo = f"{plat}-r{region}"
            silo_users.setdefault(silo, []).append((int(uid), split))
            silo_events.setdefault(silo, []).extend((int(uid), iid, pos) for iid, pos in evs)

    info = _info(items, regions)
    _write(out_dir, items, silo_users, silo_events, info)
    region_users: dict[str, set[tuple[int, str]]] = {}
    region_events: dict[str, list[tuple[int, int, int]]] = {}
    for silo in silo_users:
        region = "r" + silo.rsplit("-r", 1)[1]
        region_users.setdefault(region, set()).update(silo_users[silo])
        region_events.setdefault(region, []).extend(silo_events[silo])
    _write(out_dir / "layouts" / "regions", items, {r: sorted(u) for r, u in region_users.items()}, region_events,
           {**info, "layout": "regions"}, platforms=list(PLATFORMS))
    return {s: len(u) for s, u in sorted(silo_users.items())}


def _write(out_dir: Path, items: list[tuple[int, str, str, str, str]], silo_users: dict[str, list[tuple[int, str]]],
           silo_events: dict[str, list[tuple[int, int, int]]], info: dict[str, object],
           platforms: list[str] | None = None) -> None:
    """One layout's files; ``platforms``: each silo's ``silo.json`` (a region silo's)."""
    write_csv(out_dir / "items.csv.gz", ("item_id", "platform", "title", "category_path", "brand"), items)
    for silo in sorted(silo_users):
        write_csv(out_dir / "silos" / silo / "users.csv.gz", ("user_id", "split"), sorted(silo_users[silo]))
        write_csv(out_dir / "silos" / silo / "events.csv.gz", ("user_id", "item_id", "order"),
                  sorted(silo_events[silo], key=lambda e: (e[0], e[2], e[1])))
        if platforms:
            write_bytes_atomic(out_dir / "silos" / silo / "silo.json",
                               (json.dumps({"platforms": platforms}) + "\n").encode("utf-8"))
    write_bytes_atomic(out_dir / "dataset.json", (json.dumps(info, indent=2) + "\n").encode("utf-8"))


def _info(items: list[tuple[int, str, str, str, str]], regions: int) -> dict[str, object]:
    return {
        "name": "amazon-art-office",
        "platforms": list(PLATFORMS),
        "regions": regions,
        "source": "Amazon Review Data 2018 (McAuley lab), Arts Crafts & Sewing and Office Products, "
                  "as cut and re-indexed by TingJShen/URLLM (DG_Final/AO); research use only, no formal license",
        "interest_level": _interest_levels(items),
        "migration_k": 5,
        "format_version": 1,
    }


def _interest_levels(items: list[tuple[int, str, str, str, str]]) -> dict[str, int]:
    """Each platform's interest level by the rule (:func:`shared_model.interests.rule_level`)."""
    by_platform: dict[str, list[Item]] = {}
    for iid, plat, title, path, _brand in items:
        cats = tuple(c.strip() for c in path.split(PATH_SEPARATOR.strip())) if path else ()
        by_platform.setdefault(plat, []).append(Item(str(iid), plat, title, cats))
    levels: dict[str, int] = {}
    for plat, its in sorted(by_platform.items()):
        chosen = rule_level(its)
        if chosen is None:
            raise ValueError(f"platform {plat}: no category level reached by half of its items")
        levels[plat] = chosen.level
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m simulations.datasets.convert_amazon",
        description="Convert the raw Amazon Arts-Office folder (URLLM cut) into a fedshift dataset: "
                    "items.csv.gz, dataset.json and silos/<platform>-r<region>/{users,events}.csv.gz (the "
                    "platforms layout), and layouts/regions/ (one silo per region holding both platforms). "
                    "The output is reproducible byte for byte.",
    )
    p.add_argument("raw_dir", type=Path, help="raw folder (item_list*_F.csv, *_F2.txt, userlist.txt)")
    p.add_argument("out_dir", type=Path, help="dataset folder to write (e.g. data/amazon-art-office)")
    p.add_argument("--regions", type=int, default=2, help="regions per platform (default: 2)")
    a = p.parse_args(argv)
    for silo, n in convert(a.raw_dir, a.out_dir, a.regions).items():
        print(f"{silo}: {n} users")
    return 0


if __name__ == "__main__":
    sys.exit(main())
