"""Interest classes: the per-platform level rule, dataset.json overrides, derived interests
for titles-only catalogues, and the agreement statistics."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shared_model.cluster_agreement import adjusted_rand_index, purity
from shared_model.dataset import DEFAULT_DATASET, load_catalogue, load_dataset, validate_dataset
from shared_model.derived_interests import choose_k, class_names, cluster
from shared_model.examples import eval_examples, migration_defined
from shared_model.interests import MAX_SHARE, MIN_CLASSES, choose, declared_levels, rule_level
from shared_model.schema import DataError, Item
from simulations.datasets.generator import generate
from simulations.datasets.titles_only import make_titles_only

REPO = Path(__file__).resolve().parents[1]


def test_adjusted_rand_index_known_values() -> None:
    # Worked by hand from Hubert & Arabie's formula: index 1, expected 1/3, max 3/2 -> 4/7
    # (also scikit-learn's documented value 0.57 for this pair).
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert adjusted_rand_index(list("aabbcc"), list("abcabc")) < 0  # worse than chance


def test_purity_matches_the_textbook_example() -> None:
    # Manning, Raghavan & Schütze (2008), Fig. 16.4: clusters (5x,1o), (1x,4o,1d), (2x,3d) -> 12/17 ≈ 0.71.
    truth = list("xxxxxo") + list("xooood") + list("xxddd")
    pred = [1] * 6 + [2] * 6 + [3] * 5
    assert purity(truth, pred) == pytest.approx(12 / 17)


def _items(paths: list[tuple[str, ...]]) -> list[Item]:
    return [Item(str(i), "p", f"t{i}", path) for i, path in enumerate(paths)]


def test_rule_takes_the_shallowest_balanced_level() -> None:
    # level 2: 3 classes, one holding 80 %; level 3: classes are named with their parent, so
    # big > leaf0..9 (8 items each) and s0/s1 > 5 leaves each (2 items each): 20 classes, largest 8 %.
    paths = [("root", "big" if i < 80 else f"s{i % 2}", f"leaf{i % 10}") for i in range(100)]
    chosen = rule_level(_items(paths))
    assert chosen is not None and chosen.level == 3 and chosen.classes == 20 and chosen.largest_share == 0.08
    assert _items(paths)[0].path_label(3) == "big > leaf0"
    # a level 2 that is already balanced is preferred over a deeper one
    flat = [("root", f"c{i % 8}", f"leaf{i % 20}") for i in range(160)]
    assert rule_level(_items(flat)).level == 2


def test_rule_ignores_levels_that_fewer_than_half_the_items_reach() -> None:
    paths = [("root", "a" if i % 2 else "b") + ((f"x{i}",) if i < 30 else ()) for i in range(100)]
    chosen = rule_level(_items(paths))
    assert chosen is not None and chosen.level == 2  # level 3 is balanced but covers 30 %
    assert rule_level(_items([()] * 10)) is None


def test_override_and_derived_choice() -> None:
    items = _items([("root", f"c{i % 8}", f"leaf{i % 20}") for i in range(160)])
    assert choose(items, 3).level == 3 and choose(items, 3).source == "dataset.json"
    assert choose(items, None).source == "rule"
    assert choose(items, "derived").level is None
    assert choose(items, 4).source == "derived"  # nobody reaches level 4: derived
    assert declared_levels({"interest_level": {"p": 3}}, ("p", "q")) == {"p": 3}
    assert declared_levels({"interest_level": 2}, ("p", "q")) == {"p": 2, "q": 2}
    for bad in ({"interest_level": 0}, {"interest_level": {"p": "x"}}, {"interest_level": {"zz": 2}}):
        with pytest.raises(DataError, match="interest_level"):
            declared_levels(bad, ("p", "q"))


def test_bundled_data_gets_arts_level_2_and_office_level_3() -> None:
    cat = load_catalogue(DEFAULT_DATASET)
    arts, office = cat.interest_choice["arts"], cat.interest_choice["office"]
    assert (arts["level"], arts["rule_level"], office["level"], office["rule_level"]) == (2, 2, 3, 3)
    for plat in ("arts", "office"):
        labels = Counter(cat.items[i].interest for i in cat.platform_item_ids(plat) if cat.items[i].interest)
        assert len(labels) >= MIN_CLASSES and max(labels.values()) / sum(labels.values()) <= MAX_SHARE
    assert "office school supplies > paper" in cat.interest_vocab()


def test_bad_interest_level_fails_validation(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    generate(d, users=40, platforms=2, regions=1, seed=3)
    info = json.loads((d / "dataset.json").read_text())
    info["interest_level"] = {"platform-9": 2}
    (d / "dataset.json").write_text(json.dumps(info))
    problems = validate_dataset(d)
    assert len(problems) == 1 and problems[0].field == "interest_level" and "platform-9" in problems[0].reason
    info["interest_level"] = 2
    info["interest_seed"] = "zero"
    (d / "dataset.json").write_text(json.dumps(info))
    assert [p.field for p in validate_dataset(d)] == ["interest_seed"]


def test_choose_k_scales_with_the_catalogue_within_bounds() -> None:
    assert [choose_k(n) for n in (5, 100, 800, 1250, 18639)] == [5, 8, 20, 25, 32]


def test_clustering_is_deterministic_given_the_seed() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 5
    data = np.concatenate([c + rng.normal(size=(30, 16)) for c in centres])
    a, b = cluster(data, 8, seed=1), cluster(data, 8, seed=1)
    assert (a == b).all() and len(set(a.tolist())) == 8
    truth = np.repeat(np.arange(8), 30)
    assert adjusted_rand_index(truth.tolist(), a.tolist()) > 0.9  # well-separated blobs are found
    with pytest.raises(ValueError, match="not finite"):
        cluster(np.full((10, 4), np.nan), 2, seed=0)


def test_class_names_use_distinctive_terms() -> None:
    titles = ["red acrylic paint", "blue acrylic paint set", "wool yarn red", "cotton yarn blue"]
    names = class_names(titles, np.array([0, 0, 1, 1]), "arts")
    assert names[0].startswith("arts: acrylic paint") and names[1].startswith("arts: yarn")
    assert len(set(names)) == 2


@pytest.fixture(scope="module")
def titles_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("gen") / "ds"
    generate(src, users=120, platforms=2, regions=1, seed=5)
    return make_titles_only(src, src.parent / "titles")


def test_titles_only_copy_gets_derived_interests(titles_copy: Path, tiny_bert: Path, cache_dir: Path) -> None:
    assert validate_dataset(titles_copy) == []
    catalogue, silos = load_dataset(titles_copy, str(tiny_bert))
    for plat in catalogue.platforms:
        choice = catalogue.interest_choice[plat]
        ids = catalogue.platform_item_ids(plat)
        labels = [catalogue.items[i].interest for i in ids]
        assert choice["source"] == "derived" and choice["classes"] == len(set(labels)) >= MIN_CLASSES
        assert all(lab and lab.startswith(f"{plat}: ") for lab in labels)
    cached = sorted(p.name for p in cache_dir.glob("interests-*.json"))
    assert len(cached) == 2
    again = load_catalogue(titles_copy, str(tiny_bert))  # from the cache: same classes
    assert {i: it.interest for i, it in again.items.items()} == {i: it.interest for i, it in catalogue.items.items()}
    for silo in silos.values():  # downstream: every target has a class and migration is defined
        examples = eval_examples(silo, catalogue, "test", k=5)
        assert examples and all(e.target_category for e in examples)
        assert all(migration_defined(list(e.history), e.target, catalogue) for e in examples)


def test_describe_shows_derived_interests(titles_copy: Path, tiny_bert: Path, cache_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fedshift.data_cmd", "describe", str(titles_copy), "--json",
                          "--base-model", str(tiny_bert)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for p in d["platforms"].values():
        assert p["interest"]["source"] == "derived" and len(p["classes"]) >= MIN_CLASSES
        assert p["interest"]["derived"]["k"] == len(p["classes"]) and p["interest_coverage"] == 1.0
    from fedshift.data_cmd import _text

    assert "derived interests (k-means k=" in _text(d)
