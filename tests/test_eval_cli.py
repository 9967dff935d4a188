"""`fedshift evaluate` and `fedshift recommend` on a tiny-BERT checkpoint of a generated
dataset: the per-checkpoint item index, JSON outputs and exit-2 errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedshift.cli import main
from shared_model.adapters import save_checkpoint
from shared_model.checkpoint_index import INDEX_FILE
from shared_model.config import RunConfig
from shared_model.dataset import load_catalogue
from shared_model.model import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> Path:
    """A checkpoint as the server writes it: random LoRA/heads (B ≠ 0) on the tiny BERT."""
    cfg = RunConfig(dataset=str(small_dataset), base_model=str(tiny_bert), max_eval_users=0, eval_batch_size=32)
    categories = load_catalogue(small_dataset).interest_vocab()
    model = build_model(cfg, len(categories), seed=3)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    meta = {"round": 1, "base-model": str(tiny_bert), "categories": categories, "config": cfg.to_run_config()}
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "round-001", meta)


def test_evaluate_json(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--json", "--bootstrap", "20", "--max-users", "20"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["methods"]) == {"checkpoint", "most-popular", "category-markov", "history-logit", "item-cooccurrence"}
    groups = res["methods"]["checkpoint"]
    assert {"p0", "p1", "p2", "overall", "p0->p1", "p2->p0"} <= set(groups)
    e = groups["p0"]["ndcg10"]
    assert 0 <= e["ci95"][0] <= e["value"] <= e["ci95"][1] <= 1 and e["n"] == 20
    assert 0 <= groups["overall"]["migration-auc"]["value"] <= 1
    assert res["users"]["p0"] == 20 and res["split"] == "valid"


def test_evaluate_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "bad")]) == 2
    assert "fedshift.json" in capsys.readouterr().err
    (tmp_path / "bad" / "fedshift.json").write_text("{not json")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "bad")]) == 2
    assert "fedshift.json: not valid JSON" in capsys.readouterr().err


def test_moved_dataset_exit_2(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "moved"
    shutil.copytree(checkpoint, ckpt)
    meta = json.loads((ckpt / "fedshift.json").read_text())
    meta["config"]["dataset"] = str(tmp_path / "gone")
    (ckpt / "fedshift.json").write_text(json.dumps(meta))
    assert main(["recommend", "--checkpoint", str(ckpt), "--platform", "p0", "--history", "a"]) == 2
    assert "gone: dataset folder not found" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(ckpt)]) == 2
    assert "config.dataset" in capsys.readouterr().err


def _titles(small_dataset: Path, platform: str, n: int = 3) -> str:
    cat = load_catalogue(small_dataset)
    return "; ".join(cat.items[i].title.upper() for i in cat.platform_item_ids(platform)[:n])


def test_recommend_every_platform_with_cached_index(checkpoint: Path, small_dataset: Path,
                                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ckpt = tmp_path / "round-001"
    shutil.copytree(checkpoint, ckpt, ignore=shutil.ignore_patterns(INDEX_FILE))  # start without a cache
    for n, platform in enumerate(("p0", "p1", "p2")):
        hist = _titles(small_dataset, platform) + "; a hand-typed wish"
        assert main(["recommend", "--checkpoint", str(ckpt), "--platform", platform, "--history", hist, "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert len(res["items"]) == 10 and len({i["item_id"] for i in res["items"]}) == 10
        assert [h["item_id"] is not None for h in res["history"]] == [True, True, True, False]
        matched = {h["item_id"] for h in res["history"]}
        assert not matched & {i["item_id"] for i in res["items"]}  # history items are not recommended
        assert sum(i["probability"] for i in res["interests"]) == pytest.approx(1.0, abs=1e-3)
        assert 0.0 <= res["migration_score"] <= 1.0
        move = res["new_interest"]  # where the user goes if they leave their recent categories
        recent = {h["category"] for h in res["history"] if h["category"]}
        probs = {i["category"]: i["probability"] for i in res["interests"]}
        outside = {c: q for c, q in probs.items() if c not in recent}
        if outside:
            assert move["category"] == max(outside, key=outside.get) and move["category"] not in recent
            assert move["probability_if_moving"] == pytest.approx(move["probability"] / sum(outside.values()), abs=2e-3)
        else:
            assert move is None
        assert res["index"]["source"] == ("rebuilt" if n == 0 else "checkpoint-cache")
    assert (ckpt / INDEX_FILE).is_file()
    # a changed checkpoint invalidates the cached index
    meta = json.loads((ckpt / "fedshift.json").read_text())
    (ckpt / "fedshift.json").write_text(json.dumps({**meta, "round": 2}))
    assert main(["recommend", "--checkpoint", str(ckpt), "--platform", "p0", "--history", "x", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "item index" in out and "rebuilt" in out and "score" in out
    assert main(["recommend", "--checkpoint", str(ckpt), "--platform", "p0", "--history", "x", "--bench", "5"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-cache" in out and "p50" in out and "p99" in out


def test_recommend_on_a_platform_reads_migration_on_that_platform_only(checkpoint: Path, small_dataset: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A history from two platforms, scored for p1: the migration score is read on p1's items
    alone (as migration is defined); a history from p0 only is a cold start on p1: null."""
    p0, p1 = _titles(small_dataset, "p0"), _titles(small_dataset, "p1")
    assert main(["recommend", "--checkpoint", str(checkpoint), "--platform", "p1", "--history", f"{p1}; {p0}",
                 "--json"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert main(["recommend", "--checkpoint", str(checkpoint), "--platform", "p1", "--history", p1, "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert {h["platform"] for h in mixed["history"]} == {"p0", "p1"}
    probs = np.array([i["probability"] for i in mixed["interests"]])
    assert mixed["migration_score"] is not None and 0.0 <= mixed["migration_score"] <= 1.0
    recent = {h["category"] for h in mixed["history"] if h["platform"] == "p1" and h["category"]}
    outside = sum(i["probability"] for i in mixed["interests"] if i["category"] not in recent)
    assert mixed["migration_outside_recent_mass"] == pytest.approx(outside / probs.sum(), abs=2e-3)
    assert alone["migration_score"] is not None
    assert main(["recommend", "--checkpoint", str(checkpoint), "--platform", "p1", "--history", p0, "--json"]) == 0
    cold = json.loads(capsys.readouterr().out)
    assert cold["migration_score"] is None and cold["new_interest"] is None and len(cold["items"]) == 10


def test_recommend_errors_exit_2(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["recommend", "--checkpoint", str(checkpoint)]
    assert main([*base, "--platform", "mars", "--history", "a"]) == 2
    assert "unknown platform 'mars'" in capsys.readouterr().err
    assert main([*base, "--platform", "p0", "--history", " ; ;"]) == 2
    assert "empty history" in capsys.readouterr().err
    assert main([*base, "--platform", "p0", "--history-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "h.txt"
    empty.write_text("# only a comment\n\n")
    assert main([*base, "--platform", "p0", "--history-file", str(empty)]) == 2
    assert "empty history" in capsys.readouterr().err
    assert main(["recommend", "--checkpoint", str(tmp_path / "none"), "--platform", "p0", "--history", "a"]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_evaluate_baselines_only(small_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--dataset", str(small_dataset), "--split", "test", "--bootstrap", "10", "--no-cross"]) == 0
    out = capsys.readouterr().out
    assert "item-cooccurrence" in out and "overall" in out and "->" not in out
    assert main(["evaluate", "--no-baselines"]) == 2


def test_evaluate_against_a_second_checkpoint_gives_the_paired_difference(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--against`` scores a second checkpoint on the same users and makes it the reference:
    the difference is checkpoint − against, per user, with a paired interval."""
    from shared_model.adapters import load_checkpoint, read_metadata

    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():  # another model: a different temperature and pooling
        for name, p in model.named_parameters():
            if name.startswith(("scorer.log_scale", "pool.")):
                p.add_(0.7)
    other = save_checkpoint(model, tmp_path / "round-002", {**read_metadata(checkpoint), "round": 2})
    args = ["evaluate", "--checkpoint", str(other), "--against", str(checkpoint), "--no-baselines", "--no-cross",
            "--json", "--bootstrap", "50", "--max-users", "30"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["methods"]) == {"checkpoint", "against"} and res["reference"] == "against"
    assert res["against"] == str(checkpoint)
    for group in ("p0", "p1", "overall"):
        mine, ref = res["methods"]["checkpoint"][group]["ndcg10"], res["methods"]["against"][group]["ndcg10"]
        diff = res["differences"]["checkpoint"][group]["ndcg10"]
        assert diff["value"] == pytest.approx(mine["value"] - ref["value"], abs=2e-6)  # same users (figures rounded to 1e-6)
        assert diff["ci95"][0] <= diff["value"] <= diff["ci95"][1]
    assert any(res["methods"]["checkpoint"][g]["ndcg10"]["value"] != res["methods"]["against"][g]["ndcg10"]["value"]
               for g in ("p0", "p1", "p2"))  # the two models differ: the comparison is not vacuous
    assert main(["evaluate", "--against", str(checkpoint)]) == 2
    assert "--against compares with a checkpoint" in capsys.readouterr().err
