"""``fedshift bench``: the command's wiring and each section's figures on the tiny fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedshift.cli import main


def _bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    status = main(["bench", *argv])
    out = capsys.readouterr().out
    return status, (json.loads(out) if "--json" in argv else {"text": out})


def test_traffic_json_has_the_goal_keys_and_measures_the_sent_arrays(
        small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from shared_model.encoder import load_encoder

    out = tmp_path / "bench"
    status, report = _bench(capsys, "--only", "traffic", "--json", "--out", str(out),
                            "--dataset", str(small_dataset), "--base-model", str(tiny_bert))
    assert status == 0 and report["errors"] == {}
    assert {"dp_step_ratio", "payload_ratio", "recommend_p99_ms", "scale", "machine", "goals"} <= set(report)
    assert report["dp_step_ratio"] is None and report["recommend_p99_ms"] is None and report["scale"] is None
    assert report["goals"]["dp_step_ratio"]["met"] is None
    assert json.loads((out / "bench.json").read_text()) == report  # the same figures on disk
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["opacus"]

    rows = {r["lora_mode"] or r["user_tower"]: r for r in report["sections"]["traffic"]["rows"]}
    base_params = sum(p.numel() for p in load_encoder(tiny_bert).parameters())
    for row in rows.values():
        assert row["encoder_fp32_bytes"] == 4 * base_params
        assert row["tensor_bytes"] == 4 * row["parameters_sent"] < row["payload_bytes"] < row["proto_bytes"]
        assert row["payload_ratio"] == row["payload_bytes"] / row["encoder_fp32_bytes"]
        assert row["fp16_payload_bytes"] < row["payload_bytes"]
    assert rows["ffa"]["parameters_sent"] < rows["fedavg"]["parameters_sent"]  # FFA-LoRA keeps A at home
    assert rows["sequence"]["parameters_sent"] < base_params / 100  # heads and item adaptor only, no encoder weight
    assert report["payload_ratio"] == rows["sequence"]["payload_ratio"]  # the sequence model is the default
    assert report["goals"]["payload_ratio"]["met"] == (report["payload_ratio"] <= 0.002)


def test_catalogue_and_serving_sections_on_the_tiny_fixtures(
        small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path) -> None:
    from simulations.benchmarks.catalogue import catalogue_throughput
    from simulations.benchmarks.serving import serving

    cat = catalogue_throughput(64, str(small_dataset), str(tiny_bert))
    assert cat["embedded_items"] == min(64, cat["catalogue_items"]) and cat["embed_items_per_s"] > 0
    assert cat["cache_hit_items_per_s"] > 0
    res = serving(tmp_path, 20, dataset=str(small_dataset), base_model=str(tiny_bert))
    assert res["calls"] == 20 and res["threads"] == 1 and res["history_titles"] >= 1
    assert 0 < res["p50_ms"] <= res["p99_ms"] <= res["max_ms"] and 0 < res["cpu_p50_ms"] <= res["cpu_p99_ms"]
    assert set(res["split_median_ms"]) == {"resolve", "encode_history", "score"}
    assert res["cold_start"]["ok"] and res["cold_start"]["index_source"] == "checkpoint-cache"
    assert res["long_title_100kb_s"] >= 0


def test_summary_reads_the_goal_figures_from_the_sections() -> None:
    from fedshift.bench_cmd import summary

    rows = [{"silos": 4, "round_s": 3.0, "peak_rss_gib": 1.0}, {"silos": 100, "round_s": 30.0, "peak_rss_gib": 9.5}]
    report = summary({"sections": {"dp": {"dp_step_ratio": 1.1}, "serving": {"p99_ms": 12.0},
                                   "scale": {"available": True, "rows": rows}}})
    assert (report["dp_step_ratio"], report["payload_ratio"], report["recommend_p99_ms"]) == (1.1, None, 12.0)
    assert report["scale"] == rows
    met = {k: g["met"] for k, g in report["goals"].items()}
    assert met == {"dp_step_ratio": True, "payload_ratio": None, "recommend_p99_ms": False,
                   "peak_rss_gib_100_silos": False}
    assert summary({"sections": {"scale": {"available": False, "reason": "x"}}})["scale"] is None


def test_human_summary_and_bad_arguments(small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    status, report = _bench(capsys, "--only", "traffic", "--dataset", str(small_dataset), "--base-model", str(tiny_bert))
    assert status == 0
    assert "payload_ratio" in report["text"] and "goal <= 0.002" in report["text"]
    with pytest.raises(SystemExit) as e:
        main(["bench", "--only", "everything"])
    assert e.value.code == 2
    assert main(["bench", "--only", "traffic", "--dataset", str(tmp_path / "nope")]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_dp_modes_the_run_config_refuses_start_no_process() -> None:
    from simulations.benchmarks.dp_overhead import _child

    ghost = _child("ghost", 1, 8, 0, False, 1.0, "", "")  # a 1 s timeout: a started process would fail it
    assert not ghost["ok"] and "grad-sample-mode" in ghost["error"]


@pytest.mark.slow
def test_dp_setting_times_the_silos_round_with_and_without_dp(small_dataset: Path, tiny_bert: Path,
                                                              cache_dir: Path) -> None:
    from simulations.benchmarks.dp_overhead import run_setting

    rows = [run_setting(mode, 2, 8, 0, profile=(mode == "hooks"), dataset=str(small_dataset), base_model=str(tiny_bert))
            for mode in ("plain", "hooks")]
    for row in rows:
        assert row["ok"], row
        assert row["steps"] == 2 and row["examples"] > 0 and row["s_per_example"] > 0 and row["peak_rss_mib"] > 0
    assert "train_round" in rows[1]["profile"] or "backward" in rows[1]["profile"]
