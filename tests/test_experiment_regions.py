"""`fedshift experiment --layout regions`: the smoke grid on a generated dataset whose
``layouts/regions/`` holds a mixed federation (one region silo with both platforms, two
platform silos of the other region; built by ``tests/test_region_simulation.py::region_dataset``).
It completes; every run reads mixed histories (other-platform-lags); the table has the
per-platform groups and ``switch``; local-only scores the region silo's cases of both
platforms with that silo's model; leave-one-platform-out is skipped with a note; the per-silo
table keeps the region silo's cases of both platforms in one row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedshift.cli import main
from shared_model.dataset import REGION_OTHER_PLATFORM_LAGS, load_silo, read_catalogue
from simulations.evaluation import platform_cases
from tests.test_region_simulation import region_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, cache_dir: Path) -> tuple[Path, Path]:
    from simulations.datasets.generator import generate

    src = tmp_path_factory.mktemp("gen") / "ds"
    generate(src, users=120, platforms=2, regions=2, seed=4)
    region_dataset(src, src / "layouts" / "regions")
    out = tmp_path_factory.mktemp("experiment-regions")
    assert main(["experiment", "--preset", "smoke", "--dataset", str(src), "--layout", "regions",
                 "--base-model", str(tiny_bert), "--out", str(out), "--curve-users", "8"]) == 0
    return src / "layouts" / "regions", out


def test_unknown_layout_is_refused_before_anything_is_created(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                regions: tuple[Path, Path]) -> None:
    data = regions[0].parent.parent
    assert main(["experiment", "--preset", "smoke", "--dataset", str(data), "--layout", "nope",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no layout 'nope'" in err[0] and "regions" in err[0]
    assert not (tmp_path / "out").exists()


def test_runs_read_mixed_histories_and_lopo_is_skipped(regions: tuple[Path, Path]) -> None:
    data, out = regions
    doc = json.loads((out / "results.json").read_text())
    assert doc["layout"] == "regions" and Path(doc["dataset"]) == data.resolve()
    assert doc["overrides"]["other-platform-lags"] == REGION_OTHER_PLATFORM_LAGS
    assert set(doc["runs"]) == {"fed-all-eps8", "fed-r0-eps8", "fed-p0-r1-eps8", "fed-p1-r1-eps8", "centralised"}
    for key in doc["runs"]:  # every run (federated, local-only, centralised) got the setting
        stamp = json.loads((out / "runs" / key / "experiment-run.json").read_text())["stamp"]
        assert stamp["overrides"]["other-platform-lags"] == REGION_OTHER_PLATFORM_LAGS, key
    assert (out / "runs" / "centralised" / "checkpoints" / "round-001" / "fedshift.json").is_file()
    assert not any(m.startswith("lopo-") for m in doc["methods"])
    assert any("leave-one-platform-out skipped" in n and "r0" in n for n in doc["notes"])
    assert "Note: leave-one-platform-out skipped" in (out / "results.md").read_text()


def test_groups_have_platforms_and_switch_and_local_only_scores_the_region_silo(regions: tuple[Path, Path]) -> None:
    data, out = regions
    doc = json.loads((out / "results.json").read_text())
    users = doc["users"]
    assert users["switch"] > 0 and users["switch"] < users["p0"] + users["p1"]
    for name in ("most-popular", "federated-dp-eps8", "local-only-eps8", "centralised-nonprivate"):
        groups = doc["methods"][name]["groups"]
        assert {"p0", "p1", "overall", "switch"} <= set(groups), name
        assert groups["switch"]["users"] == users["switch"]
        assert groups["overall"]["users"] == users["p0"] + users["p1"]
        if name != "most-popular":
            assert "delta-ndcg10" in groups["switch"]["metrics"]
    assert {"p0->p1", "p1->p0"} <= set(doc["methods"]["federated-dp-eps8"]["groups"])
    # the region silo's test cases: one per platform of each user's held-out events
    catalogue = read_catalogue(data)
    r0 = {"r0": load_silo(data / "silos" / "r0", catalogue)}
    cases = {p: len(platform_cases(catalogue, r0, p, "test")) for p in ("p0", "p1")}
    assert cases["p0"] > 0 and cases["p1"] > 0
    ps = doc["per-silo"]["silos"]
    assert set(ps) == {"r0", "p0-r1", "p1-r1"}
    assert ps["r0"]["platform"] == "p0+p1" and ps["r0"]["users"] == cases["p0"] + cases["p1"]
    assert ps["r0"]["local-only"]["ndcg10"]["value"] is not None
    assert sum(r["users"] for r in ps.values()) == users["p0"] + users["p1"]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["group"] for r in rows if r["method"] == "local-only-eps8"} == {"p0", "p1", "overall", "switch"}
    text = (out / "results.md").read_text()
    assert "| `local-only-eps8` | 8 (spent" in text and "| switch |" in text and "'switch' (region silos)" in text
    assert set(doc["learning-curves"]["methods"]) == {"federated-dp-eps8", "local-only-eps8"}
