"""Unequal silos from any dataset in the documented format (docs/data-format.md): each
platform's users re-partitioned into a *large* and a *small* region, the small one holding
about ``share`` of the platform's users.

A user's region is decided by a hash of the user id alone (sha256 of ``seed`` and the id,
read as a number in [0, 1); small when below ``share``): deterministic, independent of file
order and of the platform, so a user present on several platforms lives in the same region on
each, as a real region would. All splits and events of a user move together (a user is never
split across regions), and every user of a platform lands in exactly one of its two regions.

The output is a dataset folder whose catalogue (``items.csv[.gz]``) and ``dataset.json`` are
hard links to the source's (a copy across file systems), so the catalogue hash and the item
cache stay the same; ``silos/<platform>-large`` and ``silos/<platform>-small`` are written
fresh (``users.csv``, ``events.csv.gz``: the format's columns; other columns are dropped, as
the format ignores them). ``regions.json`` beside ``silos/`` records how it was made.

Everything is computed and checked before anything is written (:func:`plan_regions`); the
folder is written into a temporary sibling and renamed into place (:func:`write_regions`),
so a bad share or a platform too small for two regions with train, valid and test users is
one :class:`ValueError` line and nothing half-written.

    python -m simulations.datasets.unequal_regions SRC DST --share 0.1 [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared_model.io_utils import csv_bytes, write_bytes_atomic
from shared_model.schema import SPLITS

#: the record of how a view was made, beside ``silos/`` (not read by the loaders)
RECORD_FILE = "regions.json"
LARGE, SMALL = "large", "small"


def check_share(share: float) -> float:
    """``share`` when 0 < share <= 0.5 (the small region is the smaller one), else ValueError."""
    if not isinstance(share, (int, float)) or not 0.0 < float(share) <= 0.5:
        raise ValueError(f"small-region share {share!r}: must be in (0, 0.5] (the small region's share of each "
                         "platform's users)")
    return float(share)


def user_position(user_id: str, seed: int = 0) -> float:
    """A user's stable position in [0, 1): sha256 of ``seed`` and the id (first 8 bytes)."""
    digest = hashlib.sha256(f"fedshift-region:{seed}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def silo_name(platform: str, region: str) -> str:
    """``<platform>-<region>``, with characters outside ``[A-Za-z0-9_-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{platform}-{region}").lstrip(".") or f"silo-{region}"


@dataclass
class Regions:
    """The re-partition of a dataset, computed in memory (nothing written)."""

    source: Path
    share: float
    seed: int
    files: dict[str, bytes] = field(default_factory=dict)  # path inside the view -> content
    record: dict[str, object] = field(default_factory=dict)

    @property
    def silos(self) -> dict[str, str]:
        """New silo -> platform."""
        return {s: r["platform"] for s, r in self.record["silos"].items()}  # type: ignore[union-attr,index]


def plan_regions(dataset: Path, share: float, seed: int = 0) -> Regions:
    """Read and validate ``dataset`` and re-partition every platform's users (see module doc).

    ValueError (one line) for a bad share, a user in two silos of one platform, or a platform
    whose large or small region would lack train, valid or test users; DataError for bad data."""
    from shared_model.dataset import list_silos, load_silo, read_catalogue

    share = check_share(share)
    dataset = Path(dataset).resolve()
    catalogue = read_catalogue(dataset)
    owner: dict[tuple[str, str], str] = {}  # (platform, user) -> source silo
    rows: dict[str, dict[str, list[tuple[str, ...]]]] = {}  # new silo -> users/events rows
    record_silos: dict[str, dict[str, object]] = {}
    for name in list_silos(dataset):
        silo = load_silo(dataset / "silos" / name, catalogue)
        for uid in sorted(silo.splits):
            if (silo.platform, uid) in owner:
                raise ValueError(f"{dataset}: user {uid!r} is in silos {owner[(silo.platform, uid)]} and {name} of "
                                 f"platform {silo.platform!r}; a user must be in one silo per platform to be "
                                 "re-partitioned")
            owner[(silo.platform, uid)] = name
            region = SMALL if user_position(uid, seed) < share else LARGE
            new = silo_name(silo.platform, region)
            got = rows.setdefault(new, {"users": [], "events": []})
            rec = record_silos.setdefault(new, {"platform": silo.platform, "region": region, "from": [],
                                                "users": 0, "splits": {s: 0 for s in SPLITS}})
            if name not in rec["from"]:  # type: ignore[operator]
                rec["from"].append(name)  # type: ignore[union-attr]
            rec["users"] += 1  # type: ignore[operator]
            rec["splits"][silo.splits[uid]] += 1  # type: ignore[index]
            got["users"].append((uid, silo.splits[uid]))
            got["events"] += [(e.user_id, e.item_id, str(e.order), e.event_type) for e in silo.histories.get(uid, ())]
    platforms = sorted({p for p, _ in owner})
    for p in platforms:
        total = sum(1 for q, _ in owner if q == p)
        for region in (SMALL, LARGE):
            rec = record_silos.get(silo_name(p, region))
            counts = rec["splits"] if rec else {s: 0 for s in SPLITS}
            if not rec or any(counts[s] == 0 for s in SPLITS):  # type: ignore[index]
                n = rec["users"] if rec else 0
                raise ValueError(f"{dataset}: platform {p!r}: its {region} region at share {share:g} would hold {n} "
                                 f"of its {total} users (" + ", ".join(f"{counts[s]} {s}" for s in SPLITS)  # type: ignore[index]
                                 + "); each region needs train, valid and test users (use a larger share or a "
                                 "dataset with more users)")
            rec["share"] = round(rec["users"] / total, 6)  # type: ignore[index,operator]
    if len({silo_name(p, r) for p in platforms for r in (SMALL, LARGE)}) != 2 * len(platforms):
        raise ValueError(f"{dataset}: platforms {platforms} give clashing silo names; rename a platform")
    files: dict[str, bytes] = {}
    for new, got in sorted(rows.items()):
        files[f"silos/{new}/users.csv"] = csv_bytes(("user_id", "split"), got["users"], compress=False)
        files[f"silos/{new}/events.csv.gz"] = csv_bytes(("user_id", "item_id", "order", "event_type"), got["events"],
                                                        compress=True)
    digest = hashlib.sha256(b"".join(k.encode() + b"\0" + v for k, v in sorted(files.items()))).hexdigest()
    record = {"source": str(dataset), "share": share, "seed": seed,
              "rule": "small when sha256('fedshift-region:<seed>:<user id>') read as a number in [0, 1) < share",
              "silos": dict(sorted(record_silos.items())), "sha256": digest}
    return Regions(dataset, share, seed, files, record)


def write_regions(regions: Regions, folder: Path) -> Path:
    """Write the view into ``folder`` (reused as is when it already holds the same view)."""
    folder = Path(folder)
    try:
        if json.loads((folder / RECORD_FILE).read_text(encoding="utf-8")) == json.loads(json.dumps(regions.record)):
            return folder
    except (OSError, ValueError):
        pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name in ("items.csv", "items.csv.gz", "dataset.json"):
            src = regions.source / name
            if src.is_file():
                try:
                    os.link(src.resolve(), tmp / name)
                except OSError:
                    shutil.copy2(src, tmp / name)
        for rel, data in regions.files.items():
            write_bytes_atomic(tmp / rel, data)
        write_bytes_atomic(tmp / RECORD_FILE, json.dumps(regions.record, indent=2).encode())
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def describe(regions: Regions) -> str:
    """One line per platform: its regions' users and shares."""
    out = []
    for s, r in regions.record["silos"].items():  # type: ignore[union-attr]
        splits = ", ".join(f"{n} {k}" for k, n in r["splits"].items())
        out.append(f"{s}: {r['users']} users ({100 * r['share']:.1f} % of {r['platform']}; {splits})")
    return "; ".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.datasets.unequal_regions", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="dataset folder (docs/data-format.md)")
    p.add_argument("out", type=Path, help="folder of the new dataset (replaced when it holds another view)")
    p.add_argument("--share", type=float, default=0.1, help="the small region's share of each platform's users, "
                   "in (0, 0.5] (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the user hash (default 0)")
    args = p.parse_args(argv)
    try:
        regions = plan_regions(args.source, args.share, args.seed)
    except ValueError as e:
        print(f"unequal_regions: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    write_regions(regions, args.out)
    print(f"{args.out}: {describe(regions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
