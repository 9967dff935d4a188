"""Benchmark: a federated run with and without secure aggregation, in one process.

Runs ``fedshift simulate`` (the typed API :func:`fedshift.simulation.run_simulation`) twice
on the same config, seed and silo secrets — so both runs draw the same DP noise and differ
only by secure aggregation — first without it, then with it; evaluates each run's final
checkpoint centrally on the validation split (``fedshift evaluate --split valid``, exact
metrics: the per-round federated metrics are DP-noised under the default
``release-metrics = dp``, so the runs use ``release-metrics = none``); prints NDCG@10 of
both, their difference, and the wall-time ratio of the ServerApp's own wall seconds
(``metrics.json`` ``run.wall-seconds``: every round, its stages and evaluations, without
Flower's start-up). A run already completed in ``OUT/plain`` or ``OUT/secure`` (same
config) is reused, and a simulation whose local SuperLink did not start (``no run``, seen
under heavy load) is retried, up to 4 times::

    python -m simulations.benchmarks.secure_aggregation --out /tmp/secagg-bench

Figures of a run on this project's machine are in docs/secure-aggregation.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from fedshift.config_args import parse_set
from shared_model.config import RunConfig
from shared_model.dataset import list_silos
from simulations.benchmarks.start_retry import run_with_start_retries


def completed(run: Path, cfg: RunConfig) -> bool:
    """``run`` holds a finished run of ``cfg`` (reused instead of run again)."""
    try:
        doc = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return "wall-seconds" in doc["run"] and doc["run"]["config"] == {**cfg.to_run_config(), "out-dir": str(run)}


def final_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("round-*"))[-1]


def valid_ndcg(checkpoint: Path, max_users: int) -> tuple[float, list[float], int]:
    """NDCG@10 of ``checkpoint`` on the validation users (value, 95% interval, users)."""
    out = checkpoint.parent.parent / "evaluate-valid.json"
    cmd = [sys.executable, "-m", "fedshift.cli", "evaluate", "--checkpoint", str(checkpoint), "--split", "valid",
           "--no-baselines", "--no-cross", "--bootstrap", "200", "--max-users", str(max_users), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    est = json.loads(out.read_text())["methods"]["checkpoint"]["overall"]["ndcg10"]
    return float(est["value"]), est["ci95"], int(est["n"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the two runs (plain/, secure/)")
    p.add_argument("--rounds", type=int, default=3, help="server rounds (default 3, the quick preset)")
    p.add_argument("--silos", type=int, default=4, help="silos of the dataset (default 4: all of the bundled data)")
    p.add_argument("--dataset", default="", help="dataset folder (default: bundled)")
    p.add_argument("--base-model", default="", help="BERT folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--max-users", type=int, default=0, help="validation users to evaluate (default 0: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another run-config value")
    args = p.parse_args(argv)
    cfg = RunConfig().replace(**{"dataset": args.dataset, "base-model": args.base_model, "num-server-rounds":
                                 args.rounds, "release-metrics": "none", **parse_set(args.set)})
    silos = list_silos(cfg.dataset_dir())
    if len(silos) != args.silos:
        print(f"{cfg.dataset_dir()} has {len(silos)} silos, not {args.silos}", file=sys.stderr)
        return 2
    cfg = cfg.replace(**{"min-nodes": len(silos)})
    out = Path(args.out).expanduser().resolve()
    rows = {}
    for name, secure in (("plain", False), ("secure", True)):
        run_cfg = cfg.replace(**{"secure-aggregation": secure})
        if completed(out / name, run_cfg):
            print(f"{name}: reusing the completed run in {out / name}", flush=True)
        else:
            result, _ = run_with_start_retries(run_cfg, out / name, attempts=5, silo_seed=0)
            if not result.ok:
                print(f"{name}: the run did not complete ({result.status}); see {result.log}", file=sys.stderr)
                return 1
        wall = float(json.loads((out / name / "metrics.json").read_text())["run"]["wall-seconds"])
        rows[name] = (wall, *valid_ndcg(final_checkpoint(out / name), args.max_users))
    (t0, n0, ci0, users), (t1, n1, ci1, _) = rows["plain"], rows["secure"]
    print(f"\n{len(silos)} silos, {cfg.num_server_rounds} rounds × {cfg.local_steps} local steps, seed {cfg.seed}, "
          f"same silo secrets; {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"validation NDCG@10 ({users} users, final checkpoint, `fedshift evaluate --split valid`):")
    print(f"  without secure aggregation  {n0:.6f}  95% CI [{ci0[0]:.4f}, {ci0[1]:.4f}]  ServerApp wall {t0:7.1f} s")
    print(f"  with secure aggregation     {n1:.6f}  95% CI [{ci1[0]:.4f}, {ci1[1]:.4f}]  ServerApp wall {t1:7.1f} s")
    print(f"  difference (with − without) {n1 - n0:+.6f}   (goal: within ±0.002)")
    print(f"  wall-time ratio             {t1 / t0:.3f}     (goal: ≤ 1.3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
