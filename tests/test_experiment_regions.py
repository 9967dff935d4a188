"""`fedshift experiment --layout regions`: the smoke grid on a generated, titles-only dataset
(platforms p0 and p1, interests derived from the titles, as on a catalogue never seen) whose
``layouts/regions/`` holds a mixed federation (one region silo with both platforms, two
platform silos of the other region; built by :func:`region_dataset`). Its federated run is a
real Flower simulation of that federation: it releases popularity per platform and
transition counts per pair space (the region silo's cross pairs too), evaluates both of the
region silo's targets, and passes the audit, whose worst-case user is the one on every silo.
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
from shared_model.dataset import load_silo, read_catalogue
from shared_model.layouts import REGION_OTHER_PLATFORM_LAGS
from simulations.evaluation import platform_cases
from shared_model.io_utils import write_bytes_atomic, write_csv

pytestmark = pytest.mark.slow


def region_dataset(src: Path, out: Path, region: str = "r0") -> Path:
    """``src`` (generated, silos ``p0-rR``/``p1-rR``) with region ``region``'s two platform silos
    joined into one region silo: each user's events interleaved (p0 at even orders, p1 at odd),
    both last events moved to one order after the rest, so both are held out."""
    catalogue = read_catalogue(src)
    out.mkdir(parents=True)
    for name in ("items.csv.gz", "items.csv", "dataset.json"):
        if (src / name).exists():
            (out / name).write_bytes((src / name).read_bytes())
    silos = sorted(p.name for p in (src / "silos").iterdir())
    joined = [s for s in silos if s.endswith(f"-{region}")]
    users: dict[str, str] = {}
    events: list[tuple[str, str, int]] = []
    for i, name in enumerate(joined):
        silo = load_silo(src / "silos" / name, catalogue)
        users |= silo.splits
        for u, h in silo.histories.items():
            last = 10**6  # one order for both platforms' last events
            events += [(u, e.item_id, last if n == len(h) - 1 else 2 * e.order + i) for n, e in enumerate(h)]
    write_csv(out / "silos" / region / "users.csv", ("user_id", "split"), sorted(users.items()))
    write_csv(out / "silos" / region / "events.csv", ("user_id", "item_id", "order"), sorted(events))
    write_bytes_atomic(out / "silos" / region / "silo.json", json.dumps({"platforms": ["p0", "p1"]}).encode())
    for name in silos:
        if name not in joined:
            for f in (src / "silos" / name).iterdir():
                (out / "silos" / name).mkdir(parents=True, exist_ok=True)
                (out / "silos" / name / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, cache_dir: Path) -> tuple[Path, Path]:
    from simulations.datasets.generator import generate

    from simulations.datasets.titles_only import make_titles_only

    gen = tmp_path_factory.mktemp("gen")
    generate(gen / "labelled", users=120, platforms=2, regions=2, seed=4)
    src = make_titles_only(gen / "labelled", gen / "ds")  # titles only: interests derived, as on an unseen catalogue
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


def test_the_mixed_federation_releases_per_platform_and_space_and_evaluates_both_targets(
        regions: tuple[Path, Path]) -> None:
    data, out = regions
    doc = json.loads((out / "runs" / "fed-all-eps8" / "metrics.json").read_text())
    silos = {"r0", "p0-r1", "p1-r1"}
    assert silos <= set(next(x for x in doc["rounds"] if x["round"] == 1)["silos"])
    # one popularity release per silo; the region silo's is split and summed into both platforms
    popularity = doc["run"]["popularity"]["platforms"]
    assert popularity["p0"]["silos"] == ["p0-r1", "r0"] and popularity["p1"]["silos"] == ["p1-r1", "r0"]
    # the transition release: each platform's pairs from both its silos, the cross pairs from the region silo only
    spaces = doc["run"]["transitions"]["platforms"]
    assert set(spaces) == {"p0", "p1", "p0|p1"}
    assert spaces["p0"]["silos"] == ["p0-r1", "r0"] and spaces["p0|p1"]["silos"] == ["r0"]
    assert spaces["p0|p1"]["candidate-pairs"] > 0
    # the region silo's evaluation ranks each valid user's two targets (each on its own platform), up to the cap
    region = load_silo(data / "silos" / "r0", read_catalogue(data))
    assert region.mixed and region.platforms == ("p0", "p1")
    cap = json.loads((out / "results.json").read_text())["overrides"].get("max-eval-users", 0)
    evaluate = next(x for x in doc["rounds"] if x["round"] == 1)["silos"]["r0"]["evaluate"]
    assert evaluate["eval-users"] == min(2 * len(region.users("valid")), cap or 10**9) > 0


def test_the_mixed_federation_passes_the_audit_with_the_user_on_every_silo_as_worst_case(
        regions: tuple[Path, Path]) -> None:
    from shared_model.privacy.audit_report import audit_run

    result = audit_run(regions[1] / "runs" / "fed-all-eps8")
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    assert set(result["silos"]) == {"r0", "p0-r1", "p1-r1"}
    region = result["silos"]["r0"]
    assert region["popularity-releases"] == 1 and region["transition-releases"] == 1  # one of each, both platforms
    cross = result["cross-silo"]
    worst = max(s["epsilon-reported"] for s in result["silos"].values())
    assert cross["silos"] == 3 and cross["epsilon-user-on-every-silo-opacus-rdp"] > worst


def test_the_time_model_counts_a_region_silo_as_its_platforms(regions: tuple[Path, Path]) -> None:
    """A region silo trains and evaluates every platform it holds: its run is estimated as its
    platforms' silos' times the preset's factor, plus the overhead of a run with a region silo
    (before this, the regions paper grid was estimated at 32 min; it took 69.6 min)."""
    from dataclasses import replace

    from simulations.experiment.plan import EXPERIMENT_PRESETS, make_plan

    preset = replace(EXPERIMENT_PRESETS["smoke"], mixed_silo_factor=1.5, mixed_overhead_s=7.0)
    runs = make_plan(preset, regions[0], None).runs
    platform = runs["fed-p0-r1-eps8"].estimate_s - preset.sim_overhead_s
    region = runs["fed-r0-eps8"].estimate_s - preset.sim_overhead_s - 7.0
    assert platform > 0 and region == pytest.approx(2 * 1.5 * platform)
    assert runs["fed-all-eps8"].estimate_s - preset.sim_overhead_s - 7.0 == pytest.approx((3 + 2) * platform)
