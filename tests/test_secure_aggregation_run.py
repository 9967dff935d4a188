"""Secure aggregation in one real Flower simulation (`fedshift simulate`, tiny BERT, 3 silos,
2 rounds, reconstruction threshold 2): in round 1 what the server receives holds no silo's
update in the clear, a silo that drops after key sharing is recovered and the aggregate is
the survivors' weighted FedAvg within the stated quantisation bound; in round 2 two silos
drop, one is left, and the server refuses to aggregate, says why, and the run exits 1; the
run still passes `fedshift audit --silo-keys`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared_model.secure_aggregation import fixed_point, vectors

pytestmark = pytest.mark.slow


def _simulate(out: Path, dataset: Path, bert: Path, *extra: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fedshift.cli", "simulate", "--out", str(out), "--dataset", str(dataset),
           "--base-model", str(bert), "--rounds", "2", "--set", "local-steps=2", "--set", "batch-size=16",
           "--set", "max-eval-users=0", "--set", "secure-aggregation=true", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, env={**os.environ, **(env or {})})


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_server_sees_only_masked_updates_recovers_a_dropped_silo_and_refuses_too_few(tmp_path: Path, small_dataset: Path,
                                                                     tiny_bert: Path, cache_dir: Path) -> None:
    out, seen = tmp_path / "run", tmp_path / "intercepted"
    proc = _simulate(out, small_dataset, tiny_bert, env={"FEDSHIFT_TEST_SECAGG_DROP": "p2-r0,p1-r0@2",
                                                         "FEDSHIFT_TEST_SECAGG_RECORD": str(seen)})
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished:completed" in proc.stdout, log
    assert proc.returncode == 1, log  # dropped silos are recorded failures; round 2 was refused
    doc = json.loads((out / "metrics.json").read_text())
    assert sorted((p["round"], p["silo"], p["kind"]) for p in doc["problems"]) == [
        (1, "p2-r0", "failed"), (2, "p1-r0", "failed"), (2, "p2-r0", "failed"),
        (2, "secure-aggregation", "refused")], doc["problems"]
    first, second = doc["run"]["secure-aggregation"]
    assert first | {"quantisation-bound": 0} == {"round": 1, "asked": 3, "advertised": 3, "threshold": 2,
                                                 "holders": 3, "survivors": 1 + 1, "dropped": 1, "quantisation-bound": 0}
    why = "only 1 of 3 silos sent a masked update, fewer than the reconstruction threshold 2"
    assert second["refused"] == f"secure aggregation refused to aggregate: {why}"
    assert any("secure aggregation refused to aggregate" in line and why in line for line in proc.stderr.splitlines())
    assert not (out / "checkpoints" / "round-002").exists()  # round 2 left the model unchanged
    clear = {p.name.split("-round-")[0][5:]: _npz(p) for p in seen.glob("silo-*-round-1.npz")}
    received = {int(p.stem.rsplit("-", 1)[1]): _npz(p) for p in seen.glob("server-received-round-1-node-*.npz")}
    assert sorted(clear) == ["p0-r0", "p1-r0"] and len(received) == 2  # the dropped silo sent nothing
    weights, deltas = {}, {}
    for silo, c in clear.items():
        got = received[int(c["__node__"])]
        trained = {k[2:]: v for k, v in c.items() if k.startswith("a:")}
        sent = {k[2:]: v for k, v in c.items() if k.startswith("g:")}
        weights[silo], deltas[silo] = int(c["__weight__"]), vectors.weighted_delta(trained, sent, 1.0)
        for key, array in trained.items():  # what arrived is no silo's update in the clear
            masked = got[f"a:{key}"]
            assert masked.dtype == np.uint32 and masked.tobytes() != array.tobytes()
        flat = np.concatenate([got[f"a:{k}"].ravel() for k in sent]).view(np.int32).astype(np.float64)
        # Independent of the update, the sample correlation is ≈ N(0, 1/n): 5/√n fails an honest
        # mask once in ~2 million comparisons; the same statistic on the unmasked encoding is ≈ 1.
        bound_r = 5.0 / np.sqrt(flat.size)
        clear_r = np.corrcoef(fixed_point.encode(weights[silo] * deltas[silo], 3).view(np.int32), deltas[silo])[0, 1]
        assert bound_r < 0.2 and clear_r > 0.99, (flat.size, clear_r)  # the check can fail
        for other in (deltas[silo], np.concatenate([a.ravel() for a in trained.values()]).astype(np.float64)):
            assert abs(np.corrcoef(flat, other)[0, 1]) < bound_r, (flat.size, bound_r)
        assert np.mean(fixed_point.encode(weights[silo] * deltas[silo], 3) == np.concatenate(
            [got[f"a:{k}"].ravel() for k in sent])) < 0.01
    aggregate = {k[2:]: v for k, v in _npz(seen / "server-aggregate-round-1.npz").items()}
    total = sum(weights.values())
    mean_delta = sum(weights[s] * deltas[s] for s in clear) / total
    got_delta = vectors.weighted_delta(aggregate, sent, 1.0)
    bound = fixed_point.mean_error_bound(2, total)
    assert np.abs(got_delta - mean_delta).max() <= bound + 1e-6  # + float32 rounding of the stored arrays
    assert np.abs(mean_delta).max() > 100 * bound  # the comparison is not vacuous
    assert (out / "checkpoints" / "round-001" / "heads.safetensors").is_file()  # round 1 was aggregated
    audit = subprocess.run([sys.executable, "-m", "fedshift.cli", "audit", str(out), "--silo-keys",
                            str(out / "silo-keys")], capture_output=True, text=True, timeout=300, check=False)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
