"""`fedshift experiment --preset smoke`: the whole grid (baselines, federated DP, local-only,
centralised, leave-one-platform-out) on a generated 2-platform dataset and a tiny BERT,
through real simulations (fedshift.simulation.run_simulation, as `fedshift simulate`); checks
the table, the CSV, the plots, and that the prose of results.md quotes the preset."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedshift.cli import main

pytestmark = pytest.mark.slow

EXPECTED = {"most-popular", "category-markov", "history-logit", "item-cooccurrence", "federated-dp-eps8", "local-only-eps8",
            "centralised-nonprivate", "lopo-p0-to-p1-eps8", "lopo-p1-to-p0-eps8"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("experiment")
    assert main(["experiment", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_outputs_exist(smoke: Path) -> None:
    for name in ("results.md", "results.csv", "results.json", "ndcg-vs-epsilon.png",
                 "migrating-accuracy-vs-epsilon.png", "new-interest-vs-epsilon.png", "metric-vs-round.png",
                 "learning-curve.png", "per-silo.csv", "learning-curve.csv"):
        data = (smoke / name).read_bytes()
        assert len(data) > 100, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(smoke.glob(".*.tmp"))  # atomic writes left no temp file


def test_csv_rows_have_epsilon_delta_and_finite_intervals(smoke: Path) -> None:
    with open(smoke / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == EXPECTED
    for col in ("epsilon", "delta", "ndcg10", "ndcg10-ci95-low", "ndcg10-ci95-high",
                "category-acc1-migrating-ci95-low", "migration-auc-ci95-high"):
        assert col in rows[0]
    for r in rows:
        private = r["family"] in {"federated-dp", "local-only", "lopo"}
        assert (r["epsilon"] == "8.0") if private else (r["epsilon"] == "inf"), r
        assert (float(r["delta"]) == 1e-5) if private else r["delta"] == "", r
        if private:
            assert 0 < float(r["epsilon-spent"]) <= 8.0 + 1e-9
        for m in ("hr10", "ndcg10", "mrr", "category-acc1"):
            v, lo, hi = (float(r[m]), float(r[f"{m}-ci95-low"]), float(r[f"{m}-ci95-high"]))
            assert all(math.isfinite(x) for x in (v, lo, hi)), (r["method"], m)
            assert 0 <= lo <= v <= hi <= 1, (r["method"], r["group"], m, lo, v, hi)
        if r["method"] != "most-popular":
            d = float(r["delta-ndcg10"])
            assert float(r["delta-ndcg10-ci95-low"]) <= d <= float(r["delta-ndcg10-ci95-high"])
    groups = {(r["method"], r["group"]) for r in rows}
    assert ("local-only-eps8", "overall") in groups and ("centralised-nonprivate", "p1") in groups
    # leave-one-platform-out rows are evaluated only on the platform they never saw
    assert {g for m, g in groups if m == "lopo-p0-to-p1-eps8"} == {"p1"}
    # cross-platform groups (history on one platform only → next item on the other) for every
    # method with one model of both platforms, not for local-only or leave-one-platform-out
    cross = {(m, g) for m, g in groups if "->" in g}
    for m in ("most-popular", "category-markov", "federated-dp-eps8", "centralised-nonprivate"):
        assert {(m, "p0->p1"), (m, "p1->p0")} <= cross, m
    assert not any(m.startswith(("local-only", "lopo")) for m, _ in cross)
    assert all(r["category-acc1-migrating"] == "" for r in rows if "->" in r["group"])  # no migration flag there
    # next-interest Δ to category-Markov: every other method, within-platform groups only, inside its interval
    by = {(r["method"], r["group"]): r for r in rows}
    assert by[("category-markov", "overall")]["delta-markov-category-acc1"] == ""
    for (m, g), r in by.items():
        has = r["delta-markov-category-acc3"] != ""
        assert has == (m != "category-markov" and "->" not in g), (m, g)
        if has:
            d = float(r["delta-markov-category-acc3"])
            assert float(r["delta-markov-category-acc3-ci95-low"]) <= d <= float(r["delta-markov-category-acc3-ci95-high"])
            assert -1 <= d <= 1


def test_markdown_table(smoke: Path) -> None:
    text = (smoke / "results.md").read_text()
    assert "| method | ε (per silo) | δ |" in text and "95 % paired-bootstrap interval" in text
    assert "smoke preset: generated data" in text and "CPU cores" in text  # caption: subsampling + machine
    # the prose is generated from the preset and the methods that ran
    assert "1 round × 2 local steps × batch 16 per silo" in text
    methods = text.split("## Methods")[1].split("## Training runs")[0]
    assert "`federated-dp-eps*` (ε ∈ {8})" in methods and "federated-nonprivate" not in methods
    for m in EXPECTED:
        assert f"| `{m}` |" in text
    assert "| `lopo-p1-to-p0-eps8` | 8 (spent" in text and "| `centralised-nonprivate` | ∞ (non-private) | – |" in text
    assert "**Table 3.** Cross-platform" in text
    table1b = text.split("**Table 1b.**")[1].split("**Table 2.**")[0]
    assert "| `federated-dp-eps8` | 8 (spent" in table1b and "| `history-logit` | ∞ (non-private) | overall |" in table1b
    assert "| `category-markov` |" not in table1b  # the reference has no row against itself
    assert "| `federated-dp-eps8` | 8 (spent" in text.split("**Table 3.**")[1].split("## Methods")[0]
    assert "| p0->p1 |" in text.split("**Table 3.**")[1]


def test_runs_and_curves(smoke: Path) -> None:
    doc = json.loads((smoke / "results.json").read_text())
    # local-only of a platform's only silo is also its LOPO run: trained once
    assert set(doc["runs"]) == {"fed-all-eps8", "fed-p0-r0-eps8", "fed-p1-r0-eps8", "centralised"}
    assert doc["methods"]["lopo-p0-to-p1-eps8"]["runs"] == ["fed-p0-r0-eps8"]
    assert [r for r, _ in doc["curves"]["fed-all-eps8"]["ndcg10"]] == [0, 1]
    assert (smoke / "runs" / "centralised" / "checkpoints" / "round-001" / "fedshift.json").is_file()
    # the ceiling's progress, one line per epoch, for `tail -f` while it trains
    ceiling_log = (smoke / "runs" / "centralised" / "ceiling.log").read_text().splitlines()
    assert ceiling_log[0].startswith("ceiling: untrained model, valid NDCG@10 ")
    assert any(" epoch 1: loss " in line for line in ceiling_log) and ceiling_log[-1].startswith("ceiling: chose lr ")
    assert sorted(p.name for p in (smoke / "views" / "fed-p0-r0-eps8" / "silos").iterdir()) == ["p0-r0"]


def test_per_silo_table_and_learning_curves(smoke: Path) -> None:
    doc = json.loads((smoke / "results.json").read_text())
    ps = doc["per-silo"]
    assert (ps["federated"], ps["local-only"]) == ("federated-dp-eps8", "local-only-eps8")
    assert set(ps["silos"]) == {"p0-r0", "p1-r0"}
    for silo, r in ps["silos"].items():
        # each silo's users are its platform's users here (one region per platform): the same
        # figures as the platform rows of the two methods
        plat = doc["methods"]["federated-dp-eps8"]["groups"][r["platform"]]
        assert r["users"] == plat["users"] and r["federated"]["ndcg10"]["value"] == plat["metrics"]["ndcg10"]["value"]
        local = doc["methods"]["local-only-eps8"]["groups"][r["platform"]]["metrics"]["ndcg10"]["value"]
        d = r["delta"]["ndcg10"]
        assert d["value"] == pytest.approx(r["federated"]["ndcg10"]["value"] - local, abs=2e-6)
        assert d["ci95"][0] <= d["value"] <= d["ci95"][1]
    lc = doc["learning-curves"]
    assert set(lc["methods"]) == {"federated-dp-eps8", "local-only-eps8"}  # smoke: no non-private run
    assert lc["split"] == "valid" and all(0 < n <= 16 for n in lc["users"].values())
    for pts in lc["methods"].values():
        assert [(p["round"], p["dp-steps"]) for p in pts] == [(0, 0), (1, 2)]
        assert all(p["users"] == sum(lc["users"].values()) and 0 <= p["ndcg10"]["value"] <= 1 for p in pts)
    text = (smoke / "results.md").read_text()
    assert "**Table 4.**" in text and "| `p0-r0` | p0 |" in text and "**Table 5.**" in text
    with open(smoke / "learning-curve.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_resume_reuses_finished_runs_and_reproduces_the_table(smoke: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = json.loads((smoke / "results.json").read_text())
    stamp = json.loads((smoke / "runs" / "fed-all-eps8" / "experiment-run.json").read_text())
    assert stamp["stamp"]["epsilon"] == 8.0 and stamp["stamp"]["overrides"]["local-steps"] == 2
    # a run whose recorded settings differ is retrained, not reused (the centralised run: the
    # cheapest to retrain; the stamp check is the same for every kind of run)
    bad = smoke / "runs" / "centralised" / "experiment-run.json"
    rec = json.loads(bad.read_text())
    rec["stamp"]["overrides"]["local-steps"] = 3
    bad.write_text(json.dumps(rec))
    capsys.readouterr()
    assert main(["experiment", "--preset", "smoke", "--out", str(smoke), "--resume"]) == 0
    log = capsys.readouterr().out
    again = json.loads((smoke / "results.json").read_text())
    status = {k: r["status"] for k, r in again["runs"].items()}
    assert status == {"fed-all-eps8": "reused", "fed-p0-r0-eps8": "reused", "fed-p1-r0-eps8": "reused",
                      "centralised": "done"}, log
    assert "fed-all-eps8: reused" in log
    assert json.loads(bad.read_text())["stamp"]["overrides"]["local-steps"] == 2  # rewritten by the retrained run
    # same checkpoints, same users, same bootstrap draws → the same figures for the reused runs' methods
    for m in ("federated-dp-eps8", "local-only-eps8", "lopo-p0-to-p1-eps8", "category-markov", "history-logit"):
        assert again["methods"][m]["groups"] == first["methods"][m]["groups"], m
    assert main(["experiment", "--preset", "smoke", "--resume"]) == 2  # --resume needs --out


def test_dry_run_prints_the_paper_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["experiment", "--preset", "paper", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fed-all-eps1" in out and "fed-all-nodp" in out and "centralised" in out and "estimated time" in out
    assert not (tmp_path / "results.md").exists()
