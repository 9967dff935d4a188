"""The bundled Amazon Arts–Office data: describe, coverage, rebuild, category recovery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared_model.categories import platform_root, recover_platform, title_brand_words
from shared_model.dataset import DEFAULT_DATASET, load_catalogue
from simulations.datasets.convert_amazon import convert

REPO = Path(__file__).resolve().parents[1]
RAW = Path(__file__).resolve().parents[2] / "shared/data/amazon-art-office"


def test_describe_json_on_the_bundled_data() -> None:
    out = subprocess.run([sys.executable, "-m", "fedshift.data_cmd", "describe", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert [s["name"] for s in d["silos"]] == ["arts-r0", "arts-r1", "office-r0", "office-r1"]
    assert d["users"] == 9577
    assert sum(s["users"] for s in d["silos"] if s["platform"] == "arts") == 9577
    assert sum(s["users_by_split"]["test"] for s in d["silos"] if s["platform"] == "office") == 950
    assert sum(s["users_by_split"]["test"] for s in d["silos"] if s["platform"] == "arts") == 1000
    assert set(d["platforms"]) == {"arts", "office"}
    assert {p: v["interest"]["level"] for p, v in d["platforms"].items()} == {"arts": 2, "office": 3}
    for p in d["platforms"].values():  # the issue-12 bar: >= 8 classes, the largest <= 35 %
        assert len(p["classes"]) >= 8 and p["largest_class_share"] <= 0.35
        assert p["largest_class_share"] == round(max(p["classes"].values()) / sum(p["classes"].values()), 4)
    assert "painting drawing art supplies" in d["platforms"]["arts"]["classes"]
    assert "office school supplies > paper" in d["platforms"]["office"]["classes"]
    for s in d["silos"]:
        assert 0 < s["migration_rate"] < 1 and s["classes"] >= 3


def test_interest_coverage_at_least_95_percent() -> None:
    cat = load_catalogue(DEFAULT_DATASET)
    assert len(cat.items) == 38396 and cat.platforms == ("arts", "office")
    for plat in cat.platforms:
        ids = cat.platform_item_ids(plat)
        assert sum(cat.items[i].interest is not None for i in ids) / len(ids) >= 0.95


def test_bundled_size_under_10_mb() -> None:
    assert sum(p.stat().st_size for p in DEFAULT_DATASET.rglob("*") if p.is_file()) <= 10_000_000


@pytest.mark.skipif(not RAW.is_dir(), reason="raw shared/data/amazon-art-office not present")
def test_converter_rebuilds_bundled_files_byte_for_byte(tmp_path: Path) -> None:
    convert(RAW, tmp_path / "out")
    built = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert len(built) == 18  # the platforms layout (10 files) and layouts/regions (8)
    for rel in built:
        assert (tmp_path / "out" / rel).read_bytes() == (DEFAULT_DATASET / rel).read_bytes(), rel


def test_regions_layout_is_the_platform_silos_of_each_region_joined() -> None:
    """Each region silo holds exactly its region's platform silos' users (same splits) and events
    (same orders); its held-out items are theirs, so within-platform targets are the same."""
    from shared_model.dataset import load_silo, read_catalogue
    from shared_model.examples import eval_examples

    regions = DEFAULT_DATASET / "layouts" / "regions"
    cat = read_catalogue(DEFAULT_DATASET)
    assert read_catalogue(regions).items == cat.items
    for r in ("r0", "r1"):
        region = load_silo(regions / "silos" / r, cat)
        assert region.platforms == ("arts", "office") and region.mixed
        parts = [load_silo(DEFAULT_DATASET / "silos" / f"{p}-{r}", cat) for p in ("arts", "office")]
        assert region.splits == {u: s for part in parts for u, s in part.splits.items()}
        for u, h in region.histories.items():
            joined = sorted((e for part in parts for e in part.histories.get(u, ())), key=lambda e: (e.order, e.item_id))
            assert sorted(h, key=lambda e: (e.order, e.item_id)) == joined
        targets = {(e.user_id, e.target.item_id) for e in eval_examples(region, cat, "test")}
        assert targets == {(e.user_id, e.target.item_id) for part in parts for e in eval_examples(part, cat, "test")}


# Real attribute strings from the raw item lists (title, attribute).
REAL = [
    ("fletcher terry co framers stacked points 08 950 silver 5 8 in",
     "arts crafts sewing crafting picture framing fletcher terry"),
    ("sulky universal slimline storage box",
     "arts crafts sewing organization storage transport craft sewing supplies storage sulky"),
    ("clover wonder clips red 50 pack", "arts crafts sewing sewing sewing notions supplies clover"),
    ("omnigrid 60mm rotary cutter", "arts crafts sewing sewing quilting rotary cutters omnigrid"),
    ("tim holtz distress marker spritzer tool", "arts crafts sewing crafting paper paper crafts embossing accessories ranger"),
    ("hygloss 78548 cello sheets 8 5 by 11 inch 48 pack", "arts"),
    # items filed exactly at a node make it a node (recovery is data-driven over the platform)
    ("acme glue", "arts crafts sewing crafting acme"),
    ("acme box", "arts crafts sewing organization storage transport acme"),
    ("acme kit", "arts crafts sewing sewing acme"),
    ("acme mat", "arts crafts sewing sewing quilting acme"),
]


def test_category_recovery_on_real_strings() -> None:
    rec = recover_platform(REAL, root="arts crafts sewing")
    assert rec[0].levels == ("arts crafts sewing", "crafting", "picture framing") and rec[0].brand == "fletcher terry"
    assert rec[1].levels[1] == "organization storage transport" and rec[1].brand == "sulky"
    assert rec[2].levels == ("arts crafts sewing", "sewing", "sewing notions supplies") and rec[2].brand == "clover"
    assert rec[3].levels[:3] == ("arts crafts sewing", "sewing", "quilting") and rec[3].brand == "omnigrid"
    # no title brand: longest known node prefix; the rest is the brand
    assert rec[4].levels[:2] == ("arts crafts sewing", "crafting") and rec[4].brand.endswith("ranger")
    assert rec[5].levels == ("arts crafts sewing",) and rec[5].brand == ""


def test_bundled_catalogue_levels() -> None:
    cat = load_catalogue(DEFAULT_DATASET)
    assert cat.items["0"].categories == ("arts crafts sewing", "crafting", "picture framing")
    assert cat.items["0"].brand == "fletcher terry"
    assert cat.items["18639"].categories[:3] == ("office products", "office school supplies", "printer ink toner")
    assert cat.items["18639"].brand == "ld products"


def test_shared_first_word_is_not_a_node() -> None:
    items = [
        ("acme stapler", "office products office school supplies staplers acme"),
        ("acme pen", "office products office school supplies acme"),
        ("zed phone", "office products office electronics telephones zed"),
        ("zed printer", "office products office electronics zed"),
        ("bo chair", "office products office furniture lighting chairs bo"),
        ("bo lamp", "office products office furniture lighting bo"),
        ("mystery", "office products office electronics telephones nobrand"),
    ]
    rec = recover_platform(items)
    assert platform_root([a for _, a in items]) == ("office", "products", "office")  # why the root is given
    rec = recover_platform(items, root="office products")
    assert [r.levels[1] for r in rec] == ["office school supplies"] * 2 + ["office electronics"] * 2 + \
        ["office furniture lighting"] * 2 + ["office electronics"]
    assert rec[0].levels[2] == "staplers" and rec[6].levels[2] == "telephones" and rec[6].brand == "nobrand"


def test_title_brand_words() -> None:
    assert title_brand_words("a b ld products".split(), "ld products ink".split()) == 2
    assert title_brand_words("a b c".split(), "x y".split()) == 0
