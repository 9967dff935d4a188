"""What a transition table is worth to a trained model: the model's weights kept, its table
swapped for another, each copy evaluated on validation users against the original.

    python -m simulations.experiment.table_swap --checkpoint RUN/checkpoints/round-NNN \\
        [--dataset DIR] [--out DIR] [--noise-multiplier Z] [--variants NAME ...]

Tables, each built from the dataset's training users only (docs/transitions.md):
* ``exact``: every pair, exact counts (the non-private run's table);
* ``oracle>T``: the exact counts above T and nothing else, without noise: the most that a
  release keeping only counts above T could hold (no noise on what it keeps, no pair kept by
  noise alone);
* ``dp-mM-tX``: a DP release as a run makes it, drawn here: each silo counts its users' M
  newest pairs over the public candidate set (the checkpoint's DP popularity prior picks the
  popular items), adds Gaussian noise of std z·√M, and the server keeps the platform sums above
  X noise std. z is the silos' transition noise multiplier (``--noise-multiplier``; default:
  the mean of the checkpoint run's ``transition-release`` ledger records);
* ``dp-w3-mM-tX``: the same with a user's pairs taken within 3 events (not only consecutive).

The noise is drawn with fixed seeds, not a silo's secret: this is a measurement, not a release.
Each copy is scored by ``fedshift evaluate --split valid --against CHECKPOINT`` (paired
intervals); the copies are deleted after, and ``OUT/results.json`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_VARIANTS = ("exact", "oracle>4", "oracle>9", "oracle>18", "dp-m2-t4", "dp-m4-t4", "dp-m8-t3", "dp-m8-t4",
                    "dp-m8-t5", "dp-w3-m8-t4", "dp-w3-m16-t4")


def parse_variant(name: str) -> dict[str, Any]:
    """``exact`` | ``oracle>T`` | ``dp-mM-tX`` | ``dp-w3-mM-tX`` → the table's recipe."""
    if name == "exact":
        return {"m": 8, "window": 1, "threshold": 0.0, "dp": False, "above": 0.0}
    if name.startswith("oracle>") and name[7:].replace(".", "", 1).isdigit():
        return {"m": 8, "window": 1, "threshold": 0.0, "dp": False, "above": float(name[7:])}
    parts = name.split("-")
    if parts[0] == "dp" and len(parts) in (3, 4):
        try:
            window = int(parts[1][1:]) if len(parts) == 4 and parts[1].startswith("w") else 1
            m, t = parts[-2:]
            if m[0] == "m" and t[0] == "t" and (len(parts) == 3 or parts[1][0] == "w"):
                return {"m": int(m[1:]), "window": window, "threshold": float(t[1:]), "dp": True, "above": 0.0}
        except (ValueError, IndexError):
            pass
    raise ValueError(f"variant {name!r}: expected exact, oracle>T, dp-mM-tX or dp-w3-mM-tX")


def ledger_noise(checkpoint: Path) -> float | None:
    """The mean transition noise multiplier of the run's silo ledgers, if the run folder has them."""
    run = checkpoint.resolve().parent.parent
    z = [json.loads(line)["noise-multiplier"] for f in sorted(run.glob("silo-state/*/ledger.jsonl"))
         for line in f.read_text().splitlines() if '"transition-release"' in line]
    return float(np.mean(z)) if z else None


def build_tables(checkpoint: Path, dataset: Path, variants: list[str], z: float) -> dict[str, tuple[np.ndarray, ...]]:
    from safetensors.torch import load_file

    from fl_server.transitions import catalogue_rows, platform_candidates
    from shared_model.config import RunConfig
    from shared_model.dataset import list_silos, load_silo, read_catalogue
    from shared_model.examples import train_user_ids
    from shared_model.item_index import build_item_index
    from shared_model.transitions import _keys, counts_over, noisy_counts, pair_counts, sum_releases

    cfg = RunConfig(dataset=str(dataset))
    catalogue = read_catalogue(dataset)
    index = build_item_index(catalogue, None, cfg.max_item_tokens)
    n = len(catalogue.items)
    silos = {name: load_silo(dataset / "silos" / name, catalogue) for name in list_silos(dataset)}
    if mixed := sorted(name for name, silo in silos.items() if silo.mixed):
        raise ValueError(f"{dataset}: silo(s) {', '.join(mixed)} hold several platforms; table_swap handles "
                         "one-platform silos only (use the platforms layout)")
    log_prior = load_file(str(checkpoint / "heads.safetensors"))["popularity_prior.log_prior"].numpy()
    candidates = platform_candidates(cfg, catalogue, index, {p: np.exp(log_prior[r])
                                                             for p, r in catalogue_rows(catalogue).items()})
    out = {}
    for name in variants:
        v = parse_variant(name)
        seeds = iter(range(1000))
        releases: dict[str, list] = {}
        for silo in silos.values():
            exact = pair_counts(silo, train_user_ids(silo), index.row, v["m"], v["window"])
            if v["dp"]:
                a, b = candidates[silo.platform]
                noisy = noisy_counts(counts_over(exact, (a, b), n), z, v["m"], next(seeds))
                releases.setdefault(silo.platform, []).append((a, b, noisy, z * math.sqrt(v["m"])))
            else:
                releases.setdefault(silo.platform, []).append((*exact, 0.0))
        parts = [sum_releases(r, v["threshold"], n)[0] for r in releases.values()]
        a, b, c = (np.concatenate([getattr(t, k)[t.counts > v["above"]] for t in parts]) for k in ("a", "b", "counts"))
        order = np.argsort(_keys(a, b, n))
        out[name] = (a[order], b[order], c[order])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.experiment.table_swap", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--checkpoint", required=True, type=Path, metavar="DIR", help="a sequence-model checkpoint (RUN/checkpoints/round-NNN)")
    p.add_argument("--dataset", type=Path, metavar="DIR", help="dataset folder (default: the checkpoint's run dataset)")
    p.add_argument("--out", type=Path, default=Path("table-swap"), metavar="DIR", help="results folder (default: ./table-swap)")
    p.add_argument("--noise-multiplier", type=float, metavar="Z", help="z of the drawn DP releases (default: the run's ledgers)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME", help="tables to try (default: %(default)s)")
    args = p.parse_args(argv)
    if not (args.checkpoint / "fedshift.json").is_file() or not (args.checkpoint / "heads.safetensors").is_file():
        p.error(f"{args.checkpoint}: not a checkpoint folder (fedshift.json and heads.safetensors expected)")
    for name in args.variants:
        try:
            parse_variant(name)
        except ValueError as e:
            p.error(str(e))
    meta = json.loads((args.checkpoint / "fedshift.json").read_text())
    dataset = args.dataset or Path(meta["config"]["dataset"])
    z = args.noise_multiplier or ledger_noise(args.checkpoint)
    if z is None and any(parse_variant(v)["dp"] for v in args.variants):
        p.error("no transition-release record in the run's silo ledgers: give --noise-multiplier")
    import torch
    from safetensors.torch import load_file, save_file

    tables = build_tables(args.checkpoint, dataset, args.variants, z or 0.0)
    heads = load_file(str(args.checkpoint / "heads.safetensors"))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"checkpoint": str(args.checkpoint), "dataset": str(dataset), "noise-multiplier": z,
                               "own-table-pairs": int(heads["transition_table.a"].numel()), "variants": {}}
    print(f"valid NDCG@10 of the checkpoint's weights with each table (overall, then each platform); Δ: paired, "
          f"overall, against its own table ({results['own-table-pairs']} pairs)")
    for name, (a, b, c) in tables.items():
        copy = args.out / name.replace(">", "gt")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(args.checkpoint, copy)
        swapped = dict(heads, **{"transition_table.a": torch.as_tensor(a), "transition_table.b": torch.as_tensor(b),
                                 "transition_table.counts": torch.as_tensor(c.astype(np.float32))})
        save_file(swapped, str(copy / "heads.safetensors"))
        run = subprocess.run([sys.executable, "-m", "fedshift.cli", "evaluate", "--checkpoint", str(copy), "--against",
                              str(args.checkpoint), "--split", "valid", "--no-baselines", "--no-cross", "--json"],
                             capture_output=True, text=True)
        shutil.rmtree(copy)
        if run.returncode:
            print(run.stderr.strip().splitlines()[-1], file=sys.stderr)
            return run.returncode
        j = json.loads(run.stdout)
        m, d = j["methods"]["checkpoint"], j["differences"]["checkpoint"]["overall"]["ndcg10"]
        results["variants"][name] = {"pairs": len(a), "ndcg10": {g: m[g]["ndcg10"] for g in m},
                                     "delta-ndcg10": d}
        groups = "  ".join(f"{g} {m[g]['ndcg10']['value']:.4f}" for g in ["overall", *sorted(set(m) - {"overall"})])
        print(f"{name:16s} {len(a):7d}  {groups}  {d['value']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]",
              flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
