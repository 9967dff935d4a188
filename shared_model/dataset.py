"""Read and validate a fedshift dataset folder (format: ``docs/data-format.md``).

Every reader here only reads; problems are collected as :class:`Problem` lines
(``file:line: field: reason``) and raised together as one :class:`DataError`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path

from shared_model.schema import (
    DEFAULT_EVENT_TYPE,
    EVENT_TYPES,
    SPLITS,
    Catalogue,
    DataError,
    Event,
    Item,
    Problem,
    Silo,
)

DEFAULT_DATASET: Path = Path(__file__).resolve().parents[1] / "data" / "amazon-art-office"
PATH_SEPARATOR = " > "  # between category levels in items.csv's category_path

ITEM_COLUMNS = ("item_id", "platform", "title", "category_path", "brand")
EVENT_COLUMNS = ("user_id", "item_id", "order")  # event_type is optional
USER_COLUMNS = ("user_id", "split")


#: the longest CSV field accepted (bytes); a longer one is a one-line problem, not a traceback
MAX_FIELD_BYTES = 1 << 20


def outside(path: Path, root: Path) -> bool:
    """Whether ``path`` (following symlinks) lies outside ``root``."""
    return not Path(path).resolve().is_relative_to(Path(root).resolve())


def _find(folder: Path, stem: str, label: str = "") -> Path | None:
    """``stem.csv`` or ``stem.csv.gz`` inside ``folder`` (plain file first). A symlink
    that leads outside ``folder`` is a :class:`DataError`: only files inside are opened."""
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        p = folder / name
        if p.is_file():
            if outside(p, folder):
                raise DataError([Problem(f"{label}{name}", 0, "path",
                                         f"a symlink to {p.resolve()}, outside {folder}: only files inside are opened")])
            return p
    return None


def _read_rows(path: Path, label: str, required: tuple[str, ...], problems: list[Problem]) -> list[tuple[int, dict[str, str]]] | None:
    """Rows of a CSV file as ``(line, row)``; None (with problems added) when unreadable."""
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        problems.append(Problem(label, 1, "file", f"cannot read: {e}"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        problems.append(Problem(label, line, "encoding", f"undecodable bytes (not UTF-8) at byte {e.start}"))
        return None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        problems.append(Problem(label, 1, "file", "empty file (expected a header line)"))
        return None
    csv.field_size_limit(MAX_FIELD_BYTES)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _parse_rows(reader, label, required, problems)
    except csv.Error as e:  # e.g. a field over MAX_FIELD_BYTES
        problems.append(Problem(label, reader.line_num, "row", f"unreadable CSV: {e}"))
        return None


def _parse_rows(reader, label: str, required: tuple[str, ...], problems: list[Problem]) -> list[tuple[int, dict[str, str]]] | None:  # type: ignore[no-untyped-def]
    header = [h.strip() for h in next(reader)]
    if len(header) == 1 and len(required) > 1:
        for delim in (";", "\t", "|"):
            if delim in header[0]:
                problems.append(Problem(label, 1, "header", f"wrong delimiter {delim!r}: fields must be separated by ','"))
                return None
    missing = [c for c in required if c not in header]
    for c in missing:
        problems.append(Problem(label, 1, c, f"missing column (header has: {', '.join(header)})"))
    if missing:
        return None
    rows: list[tuple[int, dict[str, str]]] = []
    width = len(header)
    for rec in reader:
        line = reader.line_num
        if not rec:
            continue
        if len(rec) != width:
            problems.append(Problem(label, line, "row", f"expected {width} fields, found {len(rec)}"))
            continue
        rows.append((line, dict(zip(header, rec))))
    return rows


def _parse_order(value: str) -> int | None:
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 0 else None


def load_dataset_info(dataset_dir: Path) -> dict:
    """The optional ``dataset.json`` (``{}`` when absent); raises DataError when malformed."""
    p = Path(dataset_dir) / "dataset.json"
    if not p.is_file():
        return {}
    if outside(p, dataset_dir):
        raise DataError([Problem("dataset.json", 0, "path", f"a symlink to {p.resolve()}, outside {dataset_dir}: "
                                 "only files inside the dataset are opened")])
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError([Problem("dataset.json", getattr(e, "lineno", 1), "json", f"not valid JSON: {e}")]) from None
    if not isinstance(info, dict):
        raise DataError([Problem("dataset.json", 1, "json", "expected a JSON object")])
    plats = info.get("platforms")
    if plats is not None and not (isinstance(plats, list) and all(isinstance(x, str) and x for x in plats)):
        raise DataError([Problem("dataset.json", 1, "platforms", "expected a list of platform names")])
    return info


def load_catalogue(dataset_dir: Path, base_model: str | None = None, max_tokens: int = 32) -> Catalogue:
    """The catalogue with each platform's interest classes set (:mod:`shared_model.interests`).

    ``base_model``/``max_tokens`` pick the frozen encoder whose item embeddings derive the
    interests of a platform without a usable taxonomy (unused otherwise).
    """
    from shared_model.interests import assign_interests

    dataset_dir = Path(dataset_dir)
    return assign_interests(read_catalogue(dataset_dir), load_dataset_info(dataset_dir), base_model, max_tokens)


def read_catalogue(dataset_dir: Path) -> Catalogue:
    """Read ``items.csv[.gz]`` (and ``dataset.json`` for the declared platforms); interests unset."""
    dataset_dir = Path(dataset_dir)
    info = load_dataset_info(dataset_dir)
    declared = tuple(info.get("platforms") or ())
    path = _find(dataset_dir, "items")
    if path is None:
        raise DataError([Problem("items.csv", 0, "file", f"no items.csv or items.csv.gz in {dataset_dir}")])
    problems: list[Problem] = []
    rows = _read_rows(path, path.name, ITEM_COLUMNS, problems)
    items: dict[str, Item] = {}
    first_line: dict[str, int] = {}
    for line, r in rows or []:
        iid, plat, title = r["item_id"].strip(), r["platform"].strip(), r["title"].strip()
        bad = False
        if not iid:
            problems.append(Problem(path.name, line, "item_id", "empty item id"))
            bad = True
        elif iid in first_line:
            problems.append(Problem(path.name, line, "item_id", f"duplicate item id {iid!r} (first on line {first_line[iid]})"))
            bad = True
        if not plat:
            problems.append(Problem(path.name, line, "platform", "empty platform"))
            bad = True
        elif declared and plat not in declared:
            problems.append(Problem(path.name, line, "platform", f"unknown platform {plat!r} (dataset.json declares: {', '.join(declared)})"))
            bad = True
        if not title:
            problems.append(Problem(path.name, line, "title", "empty title"))
            bad = True
        if bad:
            continue
        cats = tuple(c.strip() for c in r["category_path"].split(PATH_SEPARATOR.strip())) if r["category_path"].strip() else ()
        items[iid] = Item(iid, plat, title, cats, r["brand"].strip())
        first_line[iid] = line
    if problems:
        raise DataError(problems)
    return Catalogue(items, declared)


def list_silos(dataset_dir: Path) -> list[str]:
    """Names of the silo folders under ``dataset_dir/silos`` (sorted). A folder whose name
    starts with ``.`` or a symlink leading outside the dataset is a :class:`DataError`
    (never silently skipped, never followed)."""
    root = Path(dataset_dir) / "silos"
    if not root.is_dir():
        return []
    problems = []
    names = []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith("."):
            problems.append(Problem(f"silos/{p.name}", 0, "path", "a silo folder name must not start with '.' "
                                    "(hidden); rename or remove it"))
        elif outside(p, dataset_dir):
            problems.append(Problem(f"silos/{p.name}", 0, "path", f"a symlink to {p.resolve()}, outside "
                                    f"{dataset_dir}: only files inside the dataset are opened"))
        else:
            names.append(p.name)
    if problems:
        raise DataError(problems)
    return names


FEDERATION_MISMATCH = "fedshift-federation-mismatch"


def federation_mismatch(num_partitions: object, dataset_dir: Path, silos: list[str]) -> str | None:
    """The error of a simulated federation (node config ``num-partitions``) whose size is not
    the dataset's silo count, or None when it fits (or the node is not simulated). The text
    starts with :data:`FEDERATION_MISMATCH`, which the server treats as fatal for the run."""
    if num_partitions is None or int(str(num_partitions)) == len(silos):
        return None
    return (f"{FEDERATION_MISMATCH}: the federation has {num_partitions} SuperNodes but {dataset_dir} has "
            f"{len(silos)} silos, so {abs(len(silos) - int(str(num_partitions)))} silo(s) would be left out or "
            f"missing; start one SuperNode per silo: flwr run . --federation-config \"num-supernodes={len(silos)}\" "
            f"(or fedshift simulate, which does)")


def declared_platforms(silo_dir: Path, catalogue: Catalogue) -> tuple[str, ...] | None:
    """The platforms a silo's optional ``silo.json`` declares (``{"platforms": [...]}``, a region
    silo's), in catalogue order; None without the file. Raises DataError when it is malformed
    or names a platform the catalogue does not have."""
    silo_dir = Path(silo_dir)
    label = f"silos/{silo_dir.name}/silo.json"
    p = silo_dir / "silo.json"
    if not p.is_file():
        return None
    if outside(p, silo_dir):
        raise DataError([Problem(label, 0, "path", f"a symlink to {p.resolve()}, outside {silo_dir}: only files "
                                 "inside the silo folder are opened")])
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError([Problem(label, getattr(e, "lineno", 1), "json", f"not valid JSON: {e}")]) from None
    plats = info.get("platforms") if isinstance(info, dict) else None
    if not (isinstance(plats, list) and plats and all(isinstance(x, str) and x for x in plats)):
        raise DataError([Problem(label, 1, "platforms", "expected a non-empty list of platform names, "
                                 'e.g. {"platforms": ["arts", "office"]}')])
    unknown = [x for x in plats if x not in catalogue.platforms]
    if unknown:
        raise DataError([Problem(label, 1, "platforms", f"unknown platform {unknown[0]!r} (the catalogue has: "
                                 f"{', '.join(catalogue.platforms)})")])
    return tuple(x for x in catalogue.platforms if x in plats)


def load_silo(silo_dir: Path, catalogue: Catalogue) -> Silo:
    """Read one silo folder (``events.csv[.gz]``, ``users.csv[.gz]``, optional ``silo.json``);
    opens nothing outside it."""
    silo_dir = Path(silo_dir)
    name = silo_dir.name
    prefix = f"silos/{name}/"
    problems: list[Problem] = []
    declared = declared_platforms(silo_dir, catalogue)

    users_path = _find(silo_dir, "users", prefix)
    events_path = _find(silo_dir, "events", prefix)
    for stem, p in (("users", users_path), ("events", events_path)):
        if p is None:
            problems.append(Problem(f"{prefix}{stem}.csv", 0, "file", "missing file (expected {0}.csv or {0}.csv.gz)".format(stem)))
    if problems:
        raise DataError(problems)
    assert users_path is not None and events_path is not None

    ulabel = prefix + users_path.name
    splits: dict[str, str] = {}
    user_line: dict[str, int] = {}
    for line, r in _read_rows(users_path, ulabel, USER_COLUMNS, problems) or []:
        uid, split = r["user_id"].strip(), r["split"].strip()
        if not uid:
            problems.append(Problem(ulabel, line, "user_id", "empty user id"))
            continue
        if split not in SPLITS:
            problems.append(Problem(ulabel, line, "split", f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})"))
            continue
        if uid in splits:
            if splits[uid] != split:
                problems.append(Problem(ulabel, line, "split", f"user {uid!r} is in two splits: {splits[uid]} (line {user_line[uid]}) and {split}"))
            else:
                problems.append(Problem(ulabel, line, "user_id", f"duplicate user {uid!r} (first on line {user_line[uid]})"))
            continue
        splits[uid] = split
        user_line[uid] = line
    if not splits and not problems:
        problems.append(Problem(ulabel, 1, "user_id", "no users (the file has only a header); every user of "
                                "events.csv must be listed"))
        raise DataError(problems)

    elabel = prefix + events_path.name
    histories: dict[str, list[Event]] = {}
    platforms: dict[str, int] = {}
    seen_order: dict[tuple[str, str, int], int] = {}
    items = catalogue.items
    for line, r in _read_rows(events_path, elabel, EVENT_COLUMNS, problems) or []:
        uid, iid, raw_order = r["user_id"].strip(), r["item_id"].strip(), r["order"].strip()
        etype = (r.get("event_type") or "").strip() or DEFAULT_EVENT_TYPE
        if not uid:
            problems.append(Problem(elabel, line, "user_id", "empty user id"))
            continue
        if uid not in splits:
            problems.append(Problem(elabel, line, "user_id", f"user {uid!r} is not in {users_path.name}"))
            continue
        item = items.get(iid)
        if item is None:
            problems.append(Problem(elabel, line, "item_id", f"unknown item id {iid!r} (not in the catalogue)"))
            continue
        order = _parse_order(raw_order)
        if order is None:
            problems.append(Problem(elabel, line, "order", f"expected a non-negative integer, got {raw_order!r}"))
            continue
        if etype not in EVENT_TYPES:
            problems.append(Problem(elabel, line, "event_type", f"unknown event type {etype!r} (expected one of: {', '.join(EVENT_TYPES)})"))
            continue
        if declared is not None and item.platform not in declared:
            problems.append(Problem(elabel, line, "item_id", f"item {iid!r} is on platform {item.platform!r}, which "
                                    f"silo.json does not declare ({', '.join(declared)})"))
            continue
        key = (uid, item.platform, order)
        if key in seen_order:
            where = f" on {item.platform}" if declared is not None and len(declared) > 1 else ""
            problems.append(Problem(elabel, line, "order", f"user {uid!r} already has an event{where} at order {order} (line {seen_order[key]})"))
            continue
        seen_order[key] = line
        if item.platform not in platforms:
            platforms[item.platform] = line
        histories.setdefault(uid, []).append(Event(uid, iid, order, etype))

    if len(platforms) > 1 and declared is None:
        (p0, l0), (p1, l1) = sorted(platforms.items(), key=lambda kv: kv[1])[:2]
        problems.append(Problem(elabel, l1, "item_id", f"silo mixes platforms: {p0!r} (line {l0}) and {p1!r}; a silo "
                                "is one platform unless its silo.json declares several (a region silo)"))
    for uid in splits:
        if uid not in histories and not problems:
            problems.append(Problem(ulabel, user_line[uid], "user_id", f"user {uid!r} has no events"))
    if problems:
        raise DataError(problems)
    rank = {p: i for i, p in enumerate(catalogue.platforms)}
    for h in histories.values():  # events of two platforms at one order: in catalogue platform order
        h.sort(key=lambda e: (e.order, rank.get(items[e.item_id].platform, 0)))
    held = declared if declared is not None else tuple(platforms)[:1] or ("",)
    return Silo(name, held, {u: splits[u] for u in splits}, histories)


def load_dataset(dataset_dir: Path, base_model: str | None = None, max_tokens: int = 32) -> tuple[Catalogue, dict[str, Silo]]:
    """The catalogue and every silo of a dataset (raises DataError on any problem)."""
    catalogue = load_catalogue(dataset_dir, base_model, max_tokens)
    silos = {s: load_silo(Path(dataset_dir) / "silos" / s, catalogue) for s in list_silos(dataset_dir)}
    return catalogue, silos


def validate_dataset(dataset_dir: Path, silos: list[str] | None = None) -> list[Problem]:
    """Every problem of a dataset folder (empty when valid): its catalogue, dataset.json and
    each silo, or only the silos named in ``silos``. Never writes."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        return [Problem(str(dataset_dir), 0, "path", "not a directory")]
    try:
        catalogue = read_catalogue(dataset_dir)
        from shared_model.interests import declared_levels, interest_seed

        info = load_dataset_info(dataset_dir)
        declared_levels(info, catalogue.platforms)
        interest_seed(info)
    except DataError as e:
        return e.problems
    try:
        silos = list_silos(dataset_dir) if silos is None else list(silos)
    except DataError as e:
        return e.problems
    if not silos:
        return [Problem("silos", 0, "path", "no silo folders under silos/")]
    problems: list[Problem] = []
    for s in silos:
        try:
            load_silo(dataset_dir / "silos" / s, catalogue)
        except DataError as e:
            problems.extend(e.problems)
    return problems


def require_valid_dataset(dataset_dir: Path, silos: list[str] | None = None) -> None:
    """:func:`validate_dataset`, raising :class:`DataError` with every problem: the check a
    command runs before it starts processes or creates its output folder."""
    if problems := validate_dataset(dataset_dir, silos):
        raise DataError(problems)
