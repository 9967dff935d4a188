"""The scale benchmark's parts without a Flower run: round timings from a Flower log, the
growth fit, the process-tree memory sampler on a real child process, the Ray backend
settings passed to `flwr run`, and the memoised accountant against Opacus."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedshift.simulation import federation_config, parse_federation_items
from simulations.benchmarks.process_memory import TreeMemory
from simulations.benchmarks.round_log import round_times
from simulations.benchmarks.scale import Point, actors, loglog_fit

LOG = """\
\x1b[92mINFO \x1b[0m:      configure_evaluate: Sampled 4 nodes (out of 4)
11/29/2026 06:53:08:INFO:configure_evaluate: Sampled 4 nodes (out of 4)
11/29/2026 06:53:18:DEBUG:Constructed ActorPool with: 2 actors
11/29/2026 06:54:17:INFO:aggregate_evaluate: Received 4 results and 0 failures
11/29/2026 06:54:17:INFO:[ROUND 1/2]
11/29/2026 06:54:17:INFO:configure_train: Sampled 4 nodes (out of 4)
11/29/2026 06:54:29:INFO:aggregate_train: Received 4 results and 0 failures
11/29/2026 06:54:29:INFO:configure_evaluate: Sampled 4 nodes (out of 4)
11/29/2026 06:54:32:INFO:aggregate_evaluate: Received 4 results and 0 failures
11/29/2026 06:54:32:INFO:[ROUND 2/2]
11/29/2026 06:54:32:INFO:configure_train: Sampled 4 nodes (out of 4)
11/29/2026 06:55:02:INFO:aggregate_train: Received 4 results and 0 failures
11/29/2026 06:55:03:INFO:configure_evaluate: Sampled 4 nodes (out of 4)
11/29/2026 06:55:10:INFO:aggregate_evaluate: Received 4 results and 0 failures
11/29/2026 06:55:10:INFO:Strategy execution finished in 53.17s
"""


def test_round_times_from_the_dated_log_lines() -> None:
    t = round_times(LOG)
    assert t["round0_s"] == 69.0
    assert t["rounds"] == [
        {"round": 1, "train_s": 12.0, "evaluate_s": 3.0, "round_s": 15.0},
        {"round": 2, "train_s": 30.0, "evaluate_s": 8.0, "round_s": 38.0},
    ]
    assert t["strategy_s"] == 53.17


def test_a_round_cut_off_before_its_evaluation_is_left_out() -> None:
    cut = LOG.split("11/29/2026 06:55:03")[0]
    assert [r["round"] for r in round_times(cut)["rounds"]] == [1]


def test_loglog_fit_recovers_a_power_law_and_a_line() -> None:
    xs = [40.0, 160.0, 640.0]
    fit = loglog_fit(xs, [2.0 * math.sqrt(x) for x in xs])
    assert fit["exponent"] == pytest.approx(0.5, abs=1e-3)
    assert fit["coefficient"] == pytest.approx(2.0, rel=1e-3)
    line = loglog_fit(xs, [5.0 + 0.25 * x for x in xs])
    assert line["per_unit_s"] == pytest.approx(0.25, rel=1e-6)
    assert line["intercept_s"] == pytest.approx(5.0, abs=1e-3)
    assert line["points"] == [[x, 5.0 + 0.25 * x] for x in xs]


@pytest.mark.parametrize("xs,ys", [([4.0, 4.0], [1.0, 2.0]), ([4.0], [1.0]), ([1.0, 2.0], [0.0, 3.0])])
def test_loglog_fit_refuses_what_it_cannot_fit(xs: list[float], ys: list[float]) -> None:
    with pytest.raises(ValueError):
        loglog_fit(xs, ys)


def test_scale_points_keep_the_catalogue_and_count_actors() -> None:
    for silos in (4, 16, 64, 100):
        p = Point(silos=silos)
        assert p.platforms * p.regions == silos and p.platforms == 4 and p.items == 640
    assert Point(silos=6).platforms == 2
    assert actors({"client-resources-num-cpus": 1}, cpus=2) == 2
    assert actors({}, cpus=2) == 1  # Flower's default: 2 CPUs per actor
    assert actors({"client-resources-num-cpus": 2, "init-args-num-cpus": 8}, cpus=2) == 4


def test_tree_memory_counts_a_child_process() -> None:
    """A child holding 300 MB raises the tree's peak RSS by about that much."""
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(3)"
    with TreeMemory(hz=10, pss_every=2, scan_every=3) as base:
        time.sleep(0.5)
    with TreeMemory(hz=10, pss_every=2, scan_every=3) as mem:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    grown = mem.peak.rss - base.peak.rss
    assert 250 * 2**20 < grown < 600 * 2**20, grown
    assert mem.peak.max_processes >= 2 and mem.peak.pss > 250 * 2**20
    row = mem.peak.as_row()
    assert row["peak_rss_gib"] == round(mem.peak.rss / 2**30, 3) and row["memory_samples"] >= 10


def test_federation_config_passes_flowers_keys_and_refuses_others() -> None:
    assert federation_config(3) == "num-supernodes=3"
    assert (federation_config(100, {"client-resources-num-cpus": 1, "init-args-num-cpus": 2})
            == "num-supernodes=100 client-resources-num-cpus=1 init-args-num-cpus=2")
    with pytest.raises(ValueError, match="unknown key"):
        federation_config(3, {"client-cpus": 1})
    with pytest.raises(ValueError, match="init-args-num-cpus cannot be set"):
        federation_config(3, {"init-args-num-cpus": 2}, ray_address="127.0.0.1:6379")
    assert federation_config(3, {"client-resources-num-cpus": 1}, ray_address="127.0.0.1:6379").endswith("=1")


def test_federation_items_are_typed_by_flowers_fields() -> None:
    assert parse_federation_items(["client-resources-num-cpus=1", "client-resources-num-gpus=0.5",
                                   "init-args-log-to-driver=false", "backend=ray"]) == {
        "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.5, "init-args-log-to-driver": False,
        "backend": "ray"}
    for bad in ("client-resources-num-cpus=one", "num_cpus=1", "verbose=maybe", "init-args-num-cpus"):
        with pytest.raises(ValueError, match="--federation-config"):
            parse_federation_items([bad])


def test_simulate_refuses_a_bad_federation_key_before_creating_anything(tmp_path, small_dataset, capsys) -> None:
    import argparse

    from fedshift import simulate_cmd

    parser = argparse.ArgumentParser()
    simulate_cmd.add_parser(parser.add_subparsers())
    out = tmp_path / "run"
    args = parser.parse_args(["simulate", "--dataset", str(small_dataset), "--out", str(out),
                              "--federation-config", "client-cpus=1"])
    assert args.func(args) == 2
    assert capsys.readouterr().err.strip().startswith("fedshift simulate: --federation-config 'client-cpus=1'")
    assert not out.exists()


@pytest.mark.parametrize("address", ["notanaddress", "127.0.0.1:", ":6379", "127.0.0.1:70000", "host:port"])
def test_a_malformed_ray_address_exits_2_before_anything_is_written(tmp_path: Path, small_dataset: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     address: str) -> None:
    from fedshift import simulate_cmd

    parser = argparse.ArgumentParser()
    simulate_cmd.add_parser(parser.add_subparsers())
    out = tmp_path / "run"
    args = parser.parse_args(["simulate", "--dataset", str(small_dataset), "--out", str(out), "--ray-address", address])
    assert args.func(args) == 2
    assert capsys.readouterr().err.strip() == (f"fedshift simulate: --ray-address {address!r}: expected HOST:PORT of a "
                                               "running Ray head (e.g. 127.0.0.1:6379) or auto")
    assert not out.exists()


def test_memoised_accountant_matches_opacus() -> None:
    from opacus.accountants import RDPAccountant

    from shared_model.privacy.accountants import create

    history = [(1.1, 1.0, 40), (3.0, 1.0, 6)]  # q = 1: Opacus's fast path
    direct = RDPAccountant()
    direct.history = list(history)
    want = direct.get_epsilon(delta=1e-5)
    acc = create("rdp")
    assert acc.epsilon(history, 1e-5) == pytest.approx(want, rel=1e-12)
    assert acc.epsilon(list(history), 1e-5) == pytest.approx(want, rel=1e-12)  # the cached answer


def test_a_start_that_missed_flowers_or_rays_fixed_timeout_is_recognised(tmp_path) -> None:
    from simulations.benchmarks.start_retry import start_failed as _start_failed

    log = tmp_path / "flwr.log"
    log.write_text("Starting local SuperLink on 127.0.0.1:37535...\n│ Failed to start local SuperLink within 15s. See logs\n")
    assert _start_failed(log)
    log.write_text("ERROR:An exception occured!! The current node timed out during startup. This could happen\n")
    assert _start_failed(log)
    log.write_text(LOG)
    assert not _start_failed(log)
    assert not _start_failed(tmp_path / "missing.log")
    assert _start_failed(tmp_path / "missing.log", "no run")  # Flower knows of no run at all
