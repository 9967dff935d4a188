"""Serialisation, examples, silo isolation and the generator's planted migration."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from shared_model.dataset import list_silos, load_catalogue, load_dataset, load_silo
from shared_model.examples import eval_examples, is_migrating, train_user_ids, training_example
from shared_model.schema import Catalogue, Event, Item
from shared_model.serialize import SEPARATOR, event_text, history_text
from simulations.datasets.generator import generate


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gen") / "ds"
    generate(d, users=120, platforms=3, regions=1, seed=7)
    return d


def _cat() -> Catalogue:
    items = {
        "a": Item("a", "x", "red paint", ("x root", "painting")),
        "b": Item("b", "x", "blue yarn", ("x root", "knitting", "yarn")),
        "c": Item("c", "x", "odd thing", ("x root",)),
        "d": Item("d", "x", "pen", ()),
    }
    return Catalogue(items)


def test_event_text() -> None:
    cat = _cat()
    assert event_text(cat.items["a"], "purchase") == "painting | red paint"
    assert event_text(cat.items["b"], "view") == "knitting | blue yarn (view)"
    assert event_text(cat.items["c"], "purchase") == "x root | odd thing"
    assert event_text(cat.items["d"], "cart") == " | pen (cart)"


def test_history_text_order_and_budget() -> None:
    cat = _cat()
    h = [Event("u", "a", 0), Event("u", "b", 1, "view"), Event("u", "a", 2)]
    full = history_text(h, cat)
    assert full == SEPARATOR.join(["painting | red paint", "knitting | blue yarn (view)", "painting | red paint"])
    assert history_text(h, cat) == full  # deterministic
    # 4 words + separator + 5 words = 10: the two newest fit, the oldest is dropped
    assert history_text(h, cat, max_tokens=10) == "knitting | blue yarn (view) ; painting | red paint"
    assert history_text(h, cat, max_tokens=4) == "painting | red paint"
    assert history_text(h, cat, max_tokens=2) == "painting |"
    assert history_text([], cat, max_tokens=5) == ""
    chars = history_text(h, cat, max_tokens=25, count_tokens=len)
    assert chars == "painting | red paint" and len(chars) <= 25


def test_migration_definition() -> None:
    cat = _cat()
    hist = [Event("u", "a", i) for i in range(3)]
    assert not is_migrating(hist, Event("u", "a", 3), cat)
    assert is_migrating(hist, Event("u", "b", 3), cat)
    long = [Event("u", "b", 0)] + [Event("u", "a", i) for i in range(1, 6)]
    assert is_migrating(long, Event("u", "b", 9), cat, k=5)  # b is older than the last 5
    assert not is_migrating(long, Event("u", "b", 9), cat, k=6)
    assert not is_migrating([], Event("u", "b", 0), cat)  # empty history: undefined -> False
    assert not is_migrating(hist, Event("u", "c", 3), cat)  # target without level 2 -> False


def test_examples_one_per_user_and_no_target_in_input(small: Path) -> None:
    cat = load_catalogue(small)
    silo = load_silo(small / "silos" / "p0-r0", cat)
    users = train_user_ids(silo)
    assert users and len(users) == len(set(users)) == len(silo.users("train"))
    rng = random.Random(0)
    for u in users:
        ex = training_example(silo, cat, u)
        events = silo.histories[u]
        assert ex.target == events[-1] and ex.history == tuple(events[:-1])
        assert ex.target not in ex.history
        text = history_text(ex.history, cat)
        assert text == history_text(ex.history, cat)
        assert text.count(SEPARATOR) == len(ex.history) - 1
        target_text = event_text(cat.items[ex.target.item_id], ex.target.event_type)
        assert not text.endswith(target_text) or ex.history[-1].item_id == ex.target.item_id
        r = training_example(silo, cat, u, rng)
        assert 1 <= len(r.history) <= len(events) - 1 and r.target == events[len(r.history)]
        assert r.target_category == cat.items[r.target.item_id].interest
    for split in ("valid", "test"):
        exs = eval_examples(silo, cat, split)
        assert [e.user_id for e in exs] == silo.users(split)
        assert all(e.target == silo.histories[e.user_id][-1] for e in exs)


def test_random_cut_is_uniform(small: Path) -> None:
    cat = load_catalogue(small)
    silo = load_silo(small / "silos" / "p1-r0", cat)
    u = max(train_user_ids(silo), key=lambda u: len(silo.histories[u]))
    n = len(silo.histories[u])
    rng = random.Random(1)
    seen = {len(training_example(silo, cat, u, rng).history) for _ in range(400)}
    assert seen == set(range(1, n))


def test_loader_opens_only_its_silo_and_the_catalogue(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalogue = load_catalogue(small)
    opened: list[Path] = []
    real_open = io.open

    def spy(file, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append(Path(file).resolve())
        return real_open(file, *a, **kw)

    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr("builtins.open", spy)
    silo_dir = (small / "silos" / "p2-r0").resolve()
    silo = load_silo(silo_dir, catalogue)
    monkeypatch.undo()
    assert silo.platform == "p2" and opened
    assert all(p.parent == silo_dir for p in opened), opened
    assert {p.name for p in opened} == {"users.csv", "events.csv"}


def test_catalogue_reads_only_items_and_dataset_json(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = io.open

    def spy(file, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append(Path(file).name)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(io, "open", spy)
    load_catalogue(small)
    monkeypatch.undo()
    assert set(opened) <= {"items.csv", "dataset.json"}


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_generator_planted_migration_is_recovered(tmp_path: Path, rate: float) -> None:
    truth = generate(tmp_path / "ds", users=1200, platforms=2, regions=2, migration_rate=rate, seed=11)
    cat, silos = load_dataset(tmp_path / "ds")
    assert sorted(silos) == list_silos(tmp_path / "ds") == ["p0-r0", "p0-r1", "p1-r0", "p1-r1"]
    flags = []
    for name, silo in silos.items():
        for u, events in silo.histories.items():
            got = is_migrating(events[:-1], events[-1], cat)
            assert got == truth[name][u]
            flags.append(got)
    assert abs(sum(flags) / len(flags) - rate) <= 0.02


def test_generator_is_deterministic_and_scales(tmp_path: Path) -> None:
    generate(tmp_path / "a", users=60, platforms=2, regions=2, seed=5)
    generate(tmp_path / "b", users=60, platforms=2, regions=2, seed=5)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for f in files:
        if f.name != "dataset.json":
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    truth = generate(tmp_path / "big", users=2400, platforms=10, regions=12, seed=1)
    assert len(truth) == 120
