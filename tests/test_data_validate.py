"""The bad-input corpus: each defect kind gives exit 2, the expected file:line message, no writes."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest

from fedshift.data_cmd import main as data_main
from shared_model.dataset import load_catalogue, load_silo, validate_dataset
from shared_model.schema import DataError

SILO = "silos/p0-r0"


def _rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))


def _write_rows(path: Path, rows: list[list[str]], delimiter: str = ",") -> None:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _set(rel: str, line: int, column: str, value: str):
    def mutate(d: Path) -> None:
        rows = _rows(d / rel)
        rows[line - 1][rows[0].index(column)] = value
        _write_rows(d / rel, rows)
    return mutate


def _drop_column(rel: str, column: str):
    def mutate(d: Path) -> None:
        rows = _rows(d / rel)
        i = rows[0].index(column)
        _write_rows(d / rel, [r[:i] + r[i + 1:] for r in rows])
    return mutate


def _duplicate_item(d: Path) -> None:
    rows = _rows(d / "items.csv")
    rows[2][0] = rows[1][0]
    _write_rows(d / "items.csv", rows)


def _semicolons(d: Path) -> None:
    _write_rows(d / SILO / "users.csv", _rows(d / SILO / "users.csv"), delimiter=";")


def _bad_bytes(d: Path) -> None:
    p = d / SILO / "events.csv"
    lines = p.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b"purchase", b"purch\xffase").replace(b"view", b"vi\xffew").replace(b"cart", b"ca\xffrt")
    p.write_bytes(b"\n".join(lines))


def _empty(d: Path) -> None:
    (d / SILO / "users.csv").write_bytes(b"")


def _two_splits(d: Path) -> None:
    rows = _rows(d / SILO / "users.csv")
    uid, split = rows[1]
    rows.append([uid, "test" if split != "test" else "train"])
    _write_rows(d / SILO / "users.csv", rows)


def _users_lines(d: Path) -> int:
    return len(_rows(d / SILO / "users.csv")) + 1


CASES = {
    "missing column": (_drop_column("items.csv", "title"), "items.csv:1: title: missing column"),
    "unknown item id": (_set(f"{SILO}/events.csv", 2, "item_id", "nope"), f"{SILO}/events.csv:2: item_id: unknown item id 'nope'"),
    "duplicate item id": (_duplicate_item, "items.csv:3: item_id: duplicate item id"),
    "non-integer position": (_set(f"{SILO}/events.csv", 3, "order", "3.5"), f"{SILO}/events.csv:3: order: expected a non-negative integer"),
    "negative position": (_set(f"{SILO}/events.csv", 4, "order", "-1"), f"{SILO}/events.csv:4: order: expected a non-negative integer"),
    "empty title": (_set("items.csv", 4, "title", " "), "items.csv:4: title: empty title"),
    "unknown platform": (_set("items.csv", 2, "platform", "mars"), "items.csv:2: platform: unknown platform 'mars'"),
    "wrong delimiter": (_semicolons, f"{SILO}/users.csv:1: header: wrong delimiter ';'"),
    "undecodable bytes": (_bad_bytes, f"{SILO}/events.csv:5: encoding: undecodable bytes"),
    "empty file": (_empty, f"{SILO}/users.csv:1: file: empty file"),
    "user in two splits": (_two_splits, None),  # line computed below
    "unknown event type": (_set(f"{SILO}/events.csv", 2, "event_type", "like"), f"{SILO}/events.csv:2: event_type: unknown event type 'like'"),
}


def _snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_clean_dataset_is_valid(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_dataset(base) == []
    assert data_main(["validate", str(base)]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_input(kind: str, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ds"
    shutil.copytree(base, d)
    mutate, expected = CASES[kind]
    if kind == "user in two splits":
        n = _users_lines(d)
        expected = f"{SILO}/users.csv:{n}: split: user"
    mutate(d)
    before = _snapshot(d)
    rc = data_main(["validate", str(d)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 2
    assert any(line.startswith(expected) for line in out), out
    assert all(line.count(":") >= 3 for line in out[:50])
    assert _snapshot(d) == before  # nothing written, nothing added


def test_loaders_reject_with_the_same_lines(base: Path, tmp_path: Path) -> None:
    d = tmp_path / "ds"
    shutil.copytree(base, d)
    _set(f"{SILO}/events.csv", 2, "item_id", "nope")(d)
    _duplicate_item(d)
    expected = [str(p) for p in validate_dataset(d)]
    with pytest.raises(DataError) as e:
        load_catalogue(d)
    assert [str(p) for p in e.value.problems] == expected
    _write_rows(d / "items.csv", _rows(base / "items.csv"))  # repair the catalogue
    expected = [str(p) for p in validate_dataset(d)]
    assert expected and expected[0].startswith(f"{SILO}/events.csv:2: item_id: unknown item id")
    with pytest.raises(DataError) as e:
        load_silo(d / SILO, load_catalogue(d))
    assert [str(p) for p in e.value.problems] == expected
    assert str(e.value).splitlines() == expected[:50]


def test_silo_mixing_platforms_is_rejected(base: Path, tmp_path: Path) -> None:
    d = tmp_path / "ds"
    shutil.copytree(base, d)
    other = _rows(d / "items.csv")
    p1_item = next(r[0] for r in other[1:] if r[1] == "p1")
    _set(f"{SILO}/events.csv", 6, "item_id", p1_item)(d)
    problems = [str(p) for p in validate_dataset(d)]
    assert any(p.startswith(f"{SILO}/events.csv:6: item_id: silo mixes platforms") for p in problems), problems


def test_many_problems_print_first_50(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ds"
    shutil.copytree(base, d)
    rows = _rows(d / SILO / "events.csv")
    for r in rows[1:]:
        r[1] = "nope"
    _write_rows(d / SILO / "events.csv", rows)
    assert data_main(["validate", str(d)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 51 and out[-1].startswith("... and ")
