"""Region silos in the format (docs/data-format.md): silo.json, orders per user and platform, the
held-out rule, migration on the target's platform, layouts, and `fedshift data validate|describe`
on them (tiny hand-made datasets and the bundled layouts/regions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedshift.data_cmd import main as data_main
from shared_model.dataset import DEFAULT_DATASET, load_catalogue, load_silo, validate_dataset
from shared_model.layouts import layout_dir, layouts
from shared_model.examples import eval_examples
from shared_model.schema import held_out

ITEMS = [  # item_id, platform, category_path; the interest label is level 2 on both platforms
    ("a1", "arts", "arts > paint > oils"),
    ("a2", "arts", "arts > paint"),
    ("a3", "arts", "arts > sewing"),
    ("a4", "arts", "arts > beads"),
    ("o1", "office", "office > paper"),
    ("o2", "office", "office > pens"),
    ("o3", "office", "office > desks"),
]
USERS = [("u1", "test"), ("u2", "train"), ("u3", "valid")]
EVENTS = [  # user, item, order; u1 and u2 end with one event per platform at their highest order
    ("u1", "a1", 0), ("u1", "o1", 1), ("u1", "o2", 2), ("u1", "o3", 3), ("u1", "a2", 4), ("u1", "o1", 4),
    ("u2", "a3", 0), ("u2", "a4", 1), ("u2", "o2", 1),
    ("u3", "a1", 0), ("u3", "a2", 1),
]
R0 = "silos/r0"


def _write_dataset(d: Path, silos: dict[str, list[tuple[str, str, int]]], silo_json: dict[str, str]) -> Path:
    d.mkdir(parents=True)
    (d / "dataset.json").write_text(json.dumps({"name": "tiny", "platforms": ["arts", "office"],
                                                "interest_level": 2, "migration_k": 5}))
    (d / "items.csv").write_text("item_id,platform,title,category_path,brand\n" + "".join(
        f"{i},{p},{i} title,{c},\n" for i, p, c in ITEMS))
    for name, events in silos.items():
        s = d / "silos" / name
        s.mkdir(parents=True)
        users = {u for u, _, _ in events}
        (s / "users.csv").write_text("user_id,split\n" + "".join(f"{u},{sp}\n" for u, sp in USERS if u in users))
        (s / "events.csv").write_text("user_id,item_id,order\n" + "".join(f"{u},{i},{o}\n" for u, i, o in events))
        if name in silo_json:
            (s / "silo.json").write_text(silo_json[name])
    return d


def _region(d: Path, silo_json: str = '{"platforms": ["arts", "office"]}',
            events: list[tuple[str, str, int]] | None = None) -> Path:
    return _write_dataset(d, {"r0": EVENTS if events is None else events}, {"r0": silo_json})


def _platform_of(item: str) -> str:
    return next(p for i, p, _ in ITEMS if i == item)


@pytest.fixture
def region(tmp_path: Path) -> Path:
    """A dataset whose platforms layout has arts-r0 and office-r0 and whose layouts/regions has r0
    (their union), as the converter builds the bundled one."""
    d = tmp_path / "ds"
    by_plat = {f"{p}-r0": [e for e in EVENTS if _platform_of(e[1]) == p] for p in ("arts", "office")}
    _write_dataset(d, by_plat, {})
    _region(d / "layouts" / "regions")
    return d


def _problems(d: Path) -> list[str]:
    return [str(p) for p in validate_dataset(d)]


def test_a_declared_region_silo_loads_with_its_platforms_in_catalogue_order(tmp_path: Path) -> None:
    d = _region(tmp_path / "ds", '{"platforms": ["office", "arts"]}')
    assert _problems(d) == []
    silo = load_silo(d / R0, load_catalogue(d))
    assert silo.platforms == ("arts", "office") and silo.mixed
    with pytest.raises(ValueError, match="holds platforms arts, office, not one"):
        silo.platform
    # the same order on two platforms is accepted; ties sort in catalogue platform order
    assert [(e.item_id, e.order) for e in silo.histories["u1"]][-2:] == [("a2", 4), ("o1", 4)]
    assert [(e.item_id, e.order) for e in silo.histories["u2"]] == [("a3", 0), ("a4", 1), ("o2", 1)]


@pytest.mark.parametrize("text, expected", [
    ('{"platforms": ["arts",\n',
     "silos/r0/silo.json:2: json: not valid JSON: Expecting value: line 2 column 1 (char 23)"),
    ('{"platforms": []}', 'silos/r0/silo.json:1: platforms: expected a non-empty list of platform names, '
                          'e.g. {"platforms": ["arts", "office"]}'),
    ('{"region": "r0"}', 'silos/r0/silo.json:1: platforms: expected a non-empty list of platform names, '
                         'e.g. {"platforms": ["arts", "office"]}'),
    ('{"platforms": ["arts", "garden"]}', "silos/r0/silo.json:1: platforms: unknown platform 'garden' "
                                          "(the catalogue has: arts, office)"),
], ids=["bad-json", "empty-list", "no-list", "unknown-platform"])
def test_a_malformed_silo_json_is_one_line(text: str, expected: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    d = _region(tmp_path / "ds", text)
    assert _problems(d) == [expected]
    assert data_main(["validate", str(d)]) == 2
    assert capsys.readouterr().out.splitlines() == [expected]


def test_an_event_on_an_undeclared_platform_is_refused(tmp_path: Path) -> None:
    d = _region(tmp_path / "ds", '{"platforms": ["arts"]}')
    assert _problems(d) == [  # events.csv lines: header, then EVENTS in order; office events on lines 3-5, 7, 10
        f"{R0}/events.csv:{n}: item_id: item {i!r} is on platform 'office', which silo.json does not declare (arts)"
        for n, i in ((3, "o1"), (4, "o2"), (5, "o3"), (7, "o1"), (10, "o2"))]


def test_a_mixed_silo_without_silo_json_is_refused(tmp_path: Path) -> None:
    d = _write_dataset(tmp_path / "ds", {"r0": EVENTS}, {})
    assert _problems(d) == [f"{R0}/events.csv:3: item_id: silo mixes platforms: 'arts' (line 2) and 'office'; a silo "
                            "is one platform unless its silo.json declares several (a region silo)"]


def test_order_is_unique_per_user_and_platform(tmp_path: Path) -> None:
    same_platform = [*EVENTS, ("u3", "a3", 1)]  # u3 already has a2 at order 1 on arts (line 12)
    d = _region(tmp_path / "same", events=same_platform)
    assert _problems(d) == [f"{R0}/events.csv:13: order: user 'u3' already has an event on arts at order 1 (line 12)"]
    other_platform = [*EVENTS, ("u3", "o3", 1)]  # the same order on office: fine
    d = _region(tmp_path / "other", events=other_platform)
    assert _problems(d) == []
    assert [e.item_id for e in load_silo(d / R0, load_catalogue(d)).histories["u3"]] == ["a1", "a2", "o3"]


def test_held_out_and_eval_examples_on_a_region_silo(tmp_path: Path) -> None:
    d = _region(tmp_path / "ds")
    catalogue = load_catalogue(d)
    silo = load_silo(d / R0, catalogue)
    u1 = silo.histories["u1"]
    assert held_out(u1) == 4 and held_out(silo.histories["u2"]) == 1 and held_out(silo.histories["u3"]) == 1
    assert held_out([]) == 0
    ex = eval_examples(silo, catalogue, "test", k=2)
    assert [(e.user_id, e.target.item_id, e.target_category) for e in ex] == [
        ("u1", "a2", "paint"), ("u1", "o1", "paper")]
    assert ex[0].history == ex[1].history == tuple(u1[:4])  # both targets: the history before their order
    # migration on the target's platform: the arts target's last 2 arts events are {paint} (not
    # migrating, although the last 2 events overall are pens and desks); the office target's last
    # 2 office events are {pens, desks} (migrating)
    assert [e.migrating for e in ex] == [False, True]
    assert [e.migrating for e in eval_examples(silo, catalogue, "test", k=1)] == [False, True]
    valid = eval_examples(silo, catalogue, "valid", k=2)
    assert [(e.user_id, e.target.item_id, len(e.history), e.migrating) for e in valid] == [("u3", "a2", 1, False)]


def test_describe_a_region_layout(region: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert layouts(region) == ["platforms", "regions"] and layout_dir(region, "regions") == region / "layouts/regions"
    assert data_main(["validate", str(region), "--layout", "regions"]) == 0
    assert capsys.readouterr().out.strip() == f"{region / 'layouts/regions'}: ok"
    assert data_main(["describe", str(region), "--layout", "regions", "--json", "-k", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layout"] == "regions" and d["layouts"] == ["platforms", "regions"] and d["users"] == 3
    [r0] = d["silos"]
    assert "platform" not in r0  # a region silo has platforms, not a platform
    assert {k: r0[k] for k in ("name", "platforms", "users", "multi_platform_users", "events")} == {
        "name": "r0", "platforms": ["arts", "office"], "users": 3, "multi_platform_users": 2, "events": 11}
    # transitions: u1 5 (the office event at order 4 follows o3, not the arts event at the same
    # order), u2 2, u3 1; switches: u1 o1@1 and a2@4, u2 o2@1
    assert (r0["transitions"], r0["platform_switches"], r0["switch_rate"]) == (8, 3, 0.375)
    # next events: u1 a2 (switch), o1; u2 a4, o2 (switch); u3 a2
    assert (r0["targets"], r0["target_switches"], r0["target_switch_rate"]) == (5, 2, 0.4)
    # migration, k=2: u1 a2 no, u1 o1 yes, u2 a4 yes, u2 o2 undefined (no office history), u3 a2 no
    assert (r0["migration_targets"], r0["migration_users"], r0["migration_rate"]) == (4, 3, 0.5)

    assert data_main(["describe", str(region), "--json", "-k", "2"]) == 0  # the platforms layout
    p = json.loads(capsys.readouterr().out)
    assert p["layout"] == "platforms" and [s["name"] for s in p["silos"]] == ["arts-r0", "office-r0"]
    arts, office = p["silos"]
    assert arts["platform"] == "arts" and arts["platforms"] == ["arts"] and office["platform"] == "office"
    assert [(s["multi_platform_users"], s["platform_switches"], s["target_switch_rate"]) for s in p["silos"]] == [
        (0, 0, 0.0), (0, 0, 0.0)]
    # k=2: arts u1 a2 no, u2 a4 yes, u3 a2 no; office u1 o1 yes, u2 undefined (one event)
    assert [(s["migration_targets"], s["migration_rate"]) for s in p["silos"]] == [(3, 0.3333), (1, 1.0)]

    assert data_main(["describe", str(region), "--layout", "regions", "-k", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1] == "layout regions (layouts: platforms, regions)"
    row = next(line for line in text if line.startswith("r0 "))
    assert row.split() == ["r0", "arts+office", "3", "2", "11", "7", "6", "2/3/6", "3", "37.5%", "40.0%", "50.0%"]


def test_an_unknown_layout_is_one_line_and_exit_2(region: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("validate", "describe"):
        assert data_main([cmd, str(region), "--layout", "countries"]) == 2
        out = capsys.readouterr()
        assert out.out == ""
        assert out.err.splitlines() == [f"fedshift data {cmd}: {region} has no layout 'countries' (it has: platforms, "
                                        f"regions; a layout is a dataset folder {region / 'layouts'}/<name>/)"]


def test_the_bundled_regions_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert data_main(["validate", str(DEFAULT_DATASET), "--layout", "regions"]) == 0
    assert capsys.readouterr().out.strip().endswith("layouts/regions: ok")
    assert data_main(["describe", str(DEFAULT_DATASET), "--layout", "regions", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layouts"] == ["platforms", "regions"] and d["users"] == 9577
    got = {s["name"]: (s["platforms"], s["users"], s["multi_platform_users"], s["transitions"], s["platform_switches"])
           for s in d["silos"]}
    # transitions = events - users (every user has one first order); a switch is an event on
    # another platform than the last event at a lower order. Counting the arts and office next
    # events at one order as a pair too (a naive walk of the sorted history) gives 65,143 and
    # 65,867 switches: 2,330 and 2,389 more, one per user whose last history event is on office.
    assert got == {"r0": (["arts", "office"], 4718, 4684, 97796, 62813),
                   "r1": (["arts", "office"], 4859, 4819, 100131, 63478)}
    r0 = d["silos"][0]
    assert (r0["targets"], r0["target_switches"], r0["migration_targets"], r0["migration_rate"]) == (
        9217, 4594, 8804, 0.4013)
    assert data_main(["describe", str(DEFAULT_DATASET), "--layout", "no-such"]) == 2
    assert capsys.readouterr().err.startswith(f"fedshift data describe: {DEFAULT_DATASET} has no layout 'no-such'")
