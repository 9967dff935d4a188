"""Benchmark: seconds per DP-SGD step of the frozen vs the adapted item tower.

One silo of the bundled data (or ``--dataset``), the bundled encoder (or ``--base-model``),
``--steps`` DP-SGD steps per setting after one warm-up step; prints seconds per step and the
ratio to the frozen tower, all measured in this one run::

    python -m simulations.benchmarks.item_tower --steps 3 --negatives 7 15
"""

from __future__ import annotations

import argparse
import time

import torch

from fl_client.dp_train import pick_device, train_round
from shared_model.privacy.state import PrivacyState
from fl_client.task import open_silo
from shared_model.config import RunConfig
from shared_model.examples import train_user_ids
from shared_model.model import build_model


def seconds_per_step(overrides: dict[str, object], steps: int, silo: int) -> float:
    cfg = RunConfig.from_run_config({**overrides, "local-steps": steps})
    data = open_silo(cfg, {"partition-id": silo})
    if cfg.item_tower == "adapted":
        data.item_tokens  # tokenise the catalogue outside the timing
    privacy = PrivacyState.calibrate(data.name, cfg, len(train_user_ids(data.silo)))
    warm = RunConfig.from_run_config({**cfg.to_run_config(), "local-steps": 1})
    train_round(build_model(cfg, len(data.categories)), data, warm, privacy, seed=0, device=pick_device(cfg))
    model = build_model(cfg, len(data.categories))  # a fresh model per round, as a silo does
    t0 = time.perf_counter()
    result = train_round(model, data, cfg, privacy, seed=1, device=pick_device(cfg))
    return (time.perf_counter() - t0) / result.steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed DP-SGD steps per setting (default 3)")
    p.add_argument("--negatives", type=int, nargs="+", default=[7, 15], help="tower-negatives K of the adapted runs")
    p.add_argument("--batch-size", type=int, default=32, help="expected Poisson batch (default 32)")
    p.add_argument("--silo", type=int, default=0, help="silo index in sorted order (default 0)")
    p.add_argument("--dataset", default="", help="dataset folder (default: bundled)")
    p.add_argument("--base-model", default="", help="BERT folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = {"dataset": args.dataset, "base-model": args.base_model, "batch-size": args.batch_size}
    frozen = seconds_per_step({**base, "item-tower": "frozen"}, args.steps, args.silo)
    print(f"device {pick_device(RunConfig())}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print(f"item-tower frozen            {frozen:7.2f} s/step   1.0×")
    for k in args.negatives:
        s = seconds_per_step({**base, "item-tower": "adapted", "tower-negatives": k}, args.steps, args.silo)
        print(f"item-tower adapted, K = {k:<3}  {s:7.2f} s/step  {s / frozen:5.1f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
