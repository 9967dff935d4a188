"""What a user reads when a figure is meaningless: an all-equal-score checkpoint scores chance
level, a dataset with no categories prints "n/a" with the reason (table and JSON), a silo
with a non-finite loss or update stops, and a run's problems decide the exit status."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from fedshift.cli import main
from fl_client.silo_round import update_failure
from fl_server.records import RunRecords
from shared_model.adapters import save_checkpoint
from shared_model.checkpoint_index import INDEX_FILE
from shared_model.config import RunConfig
from shared_model.dataset import load_dataset
from shared_model.item_index import embeddings_sha256
from shared_model.model import build_model
from shared_model.run_health import run_problems


def test_an_all_equal_score_checkpoint_reports_chance_level(small_dataset: Path, tiny_bert: Path, cache_dir: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # every item row the same unit vector and no category prior: every item scores the same
    cfg = RunConfig(dataset=str(small_dataset), base_model=str(tiny_bert), max_eval_users=0, eval_batch_size=32,
                    category_prior_weight=0.0)
    catalogue, silos = load_dataset(small_dataset)
    categories = catalogue.interest_vocab()
    meta = {"round": 0, "base-model": str(tiny_bert), "categories": categories, "config": cfg.to_run_config()}
    ckpt = save_checkpoint(build_model(cfg, len(categories), seed=3), tmp_path / "round-000", meta)
    assert main(["recommend", "--checkpoint", str(ckpt), "--platform", "p0", "--history", "a"]) == 0  # index built
    saved = torch.load(ckpt / INDEX_FILE, weights_only=True)
    saved["emb"] = torch.nn.functional.normalize(torch.ones_like(saved["emb"]), dim=1)
    saved["sha256"] = embeddings_sha256(saved["emb"])
    torch.save(saved, ckpt / INDEX_FILE)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--no-baselines", "--no-cross", "--json",
                 "--bootstrap", "10", "--split", "test"]) == 0
    res = json.loads(capsys.readouterr().out)
    for platform in catalogue.platforms:
        n = len(catalogue.platform_item_ids(platform))
        longest = max(len(h) for s in silos.values() if s.platform == platform for h in s.histories.values())
        hr = res["methods"]["checkpoint"][platform]["hr10"]["value"]
        # chance: 10 of the N − (history items) candidates left, each user
        assert 10 / n <= hr <= 10 / (n - longest), (platform, hr, n)
        assert hr < 0.2


@pytest.fixture(scope="module")
def titles_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.datasets.generator import generate

    d = tmp_path_factory.mktemp("titles") / "ds"
    generate(d, users=60, platforms=2, regions=1, seed=2)
    rows = list(csv.DictReader((d / "items.csv").open(encoding="utf-8")))
    for r in rows:
        r["category_path"] = ""
    with (d / "items.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return d


def test_a_metric_undefined_for_a_dataset_prints_na_with_the_reason(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """No user migrates (planted rate 0), so every migration metric is undefined: n/a with the
    reason in the JSON and in the table, never a number or a crash. (A titles-only catalogue
    no longer lacks interests: it gets derived ones, tests/test_interests*.)"""
    from simulations.datasets.generator import generate

    d = tmp_path / "ds"
    generate(d, users=60, platforms=2, regions=1, seed=2, migration_rate=0.0)
    assert main(["evaluate", "--dataset", str(d), "--bootstrap", "10", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    overall = res["methods"]["most-popular"]["overall"]
    acc = overall["category-acc1-migrating"]
    assert acc["value"] is None and acc["n/a"].startswith("no migrating user with a labelled target")
    assert overall["migration-auc"]["value"] is None and "needs both classes" in overall["migration-auc"]["n/a"]
    assert overall["hr10"]["value"] is not None and overall["category-acc1"]["value"] is not None
    assert main(["evaluate", "--dataset", str(d), "--bootstrap", "10"]) == 0
    text = capsys.readouterr().out
    assert "n/a: cat@1 mig (overall): no migrating user with a labelled target" in text


def test_a_silo_with_a_non_finite_loss_or_update_sends_nothing(small_dataset: Path, tiny_bert: Path) -> None:
    cfg = RunConfig(dataset=str(small_dataset), base_model=str(tiny_bert))
    model = build_model(cfg, 4, seed=0)
    assert update_failure(model, 1.25) is None
    assert update_failure(model, math.inf) == "training loss is inf (not finite)"
    with torch.no_grad():
        name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
        param.view(-1)[0] = float("nan")
    why = update_failure(model, 1.25)
    assert why is not None and "not finite after training" in why and name in why


def test_run_health_reads_outcomes(tmp_path: Path) -> None:
    assert run_problems(tmp_path / "metrics.json")[0].endswith(
        "cannot read the run's metrics ([Errno 2] No such file or directory: '" + str(tmp_path / "metrics.json") + "')")
    rec = RunRecords(tmp_path, {})
    rec.outcome(1, "train", ok=0, failed=0, declined=3)  # every silo declined by its own policy...
    rec.outcome(1, "evaluate", ok=3, failed=0)
    rec.write()
    assert run_problems(tmp_path / "metrics.json") == [  # ...and nothing ever trained: that is reported
        "no silo trained in any of 1 round(s): every reply failed or was declined (see the refusals above and in "
        "metrics.json)"]
    rec.outcome(0, "train", ok=3, failed=0)  # an earlier round trained: round 1's budgets ran out, a normal end
    rec.write()
    assert run_problems(tmp_path / "metrics.json") == []
    rec.outcome(2, "evaluate", ok=0, failed=3)
    rec.problem(2, "evaluate", "office-r0", 5, "error", "silo office-r0: model scores: 3 of 3 row(s) have non-finite scores")
    rec.write()
    assert run_problems(tmp_path / "metrics.json") == [
        "round 2: no successful evaluate reply (3 failed, 0 declined)",
        "round 2: evaluate: silo office-r0: error: silo office-r0: model scores: 3 of 3 row(s) have non-finite scores"]


def test_the_round_table_prints_na_for_an_undefined_metric(tmp_path: Path) -> None:
    rec = RunRecords(tmp_path, {"delta": 1e-5})
    rec.add(1, "evaluate", "s", 1, {"category-accuracy": float("nan"), "ndcg10": 0.5, "hr10": 0.25})
    row = rec.table(1).splitlines()[-1]
    assert row.split()[1:] == ["-", "-", "-", "n/a", "0.5000", "0.250"]


def test_a_checkpoint_with_nan_arrays_is_an_error_not_a_rank(small_dataset: Path, tiny_bert: Path, cache_dir: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = RunConfig(dataset=str(small_dataset), base_model=str(tiny_bert), max_eval_users=0, eval_batch_size=32)
    categories = load_dataset(small_dataset)[0].interest_vocab()
    model = build_model(cfg, len(categories), seed=3)
    with torch.no_grad():
        next(p for _, p in model.named_parameters() if p.requires_grad).fill_(float("nan"))
    meta = {"round": 1, "base-model": str(tiny_bert), "categories": categories, "config": cfg.to_run_config()}
    ckpt = save_checkpoint(model, tmp_path / "round-001", meta)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--no-baselines", "--no-cross", "--bootstrap", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fedshift evaluate: checkpoint scores on p0:") and "non-finite" in err


def test_recommendation_scores_that_are_not_finite_are_an_error() -> None:
    from shared_model.scoring import ScoringError, top_items

    assert top_items(torch.tensor([0.1, float("-inf"), 0.3]), 5) == ([0.30000001192092896, 0.10000000149011612], [2, 0])
    with pytest.raises(ScoringError, match="recommendation scores: 2 NaN"):
        top_items(torch.tensor([float("nan"), float("nan"), 0.3]), 5)


def test_all_row_averages_only_the_silos_that_define_a_metric() -> None:
    """The server's ALL row: a silo's -1 (undefined there) is left out of the weighted mean, not
    averaged in; a metric no silo defines stays -1 (printed n/a)."""
    from flwr.app import MetricRecord, RecordDict

    from fl_server.strategy import mean_of_defined

    def reply(**m: float) -> RecordDict:
        return RecordDict({"metrics": MetricRecord(m)})

    out = mean_of_defined([reply(**{"num-examples": 10, "hr10": 0.2, "mig": -1.0, "none": -1.0}),
                           reply(**{"num-examples": 30, "hr10": 0.6, "mig": 0.5, "none": -1.0}),
                           reply(**{"num-examples": 5, "hr10": 0.1, "mig": -1.0, "none": -1.0})], "num-examples")
    assert abs(out["hr10"] - (0.2 * 10 + 0.6 * 30 + 0.1 * 5) / 45) < 1e-12
    assert out["mig"] == 0.5 and out["none"] == -1.0 and "num-examples" not in out
