"""A real Flower simulation (`fedshift simulate`, tiny BERT, 3 silos, 1 round) in which one
silo sends NaN arrays (the environment-only test hook of :mod:`fl_client.flower_edge`): the
server refuses that update, names the silo, averages the others, records the refusal in
metrics.json, and the command exits 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow


def test_planted_nan_update_is_refused_and_named(tmp_path: Path, small_dataset: Path, tiny_bert: Path,
                                                  cache_dir: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "FEDSHIFT_TEST_CORRUPT_UPDATE": "p1-r0"}
    cmd = [sys.executable, "-m", "fedshift.cli", "simulate", "--out", str(out), "--dataset", str(small_dataset),
           "--base-model", str(tiny_bert), "--rounds", "1", "--set", "local-steps=2", "--set", "batch-size=16",
           "--set", "max-eval-users=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, env=env)
    assert "finished:completed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    named = [line for line in proc.stderr.splitlines() if "silo p1-r0" in line]
    assert named and "refused" in named[0] and "not finite" in named[0], proc.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert [(p["round"], p["silo"], p["kind"]) for p in doc["problems"]] == [(1, "p1-r0", "refused")]
    train = next(o for o in doc["outcomes"] if (o["round"], o["phase"]) == (1, "train"))
    assert (train["ok"], train["failed"]) == (2, 1)
    # the refused arrays were left out: the round's global model is finite
    arrays = load_file(str(out / "checkpoints" / "round-001" / "heads.safetensors"))  # the sequence model's arrays
    assert arrays and all(bool((a == a).all()) for a in arrays.values())
