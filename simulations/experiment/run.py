"""Run a plan: train every run (federated ones through :func:`fedshift.simulation.run_simulation`
with a typed :class:`~shared_model.config.RunConfig`, the centralised one through
:func:`simulations.experiment.centralised.train_centralised`), evaluate every method and
write the results (:func:`run_experiment`).

A run's folder ``OUT/runs/<key>/`` holds its whole output (metrics.json, checkpoints/,
ledgers, logs). A run on a subset of silos trains on a dataset *view* ``OUT/views/<key>/``
(hard links, nothing copied). A finished run records its settings in :data:`STAMP_FILE`, so
``resume`` can reuse it instead of retraining.
"""

from __future__ import annotations

import json
import os
import platform as platform_mod
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from shared_model.config import RunConfig
from shared_model.io_utils import write_bytes_atomic
from simulations.experiment.curves import plan_curves
from simulations.experiment.evaluate import evaluate_plan, last_checkpoint, round_curves
from simulations.datasets.unequal_regions import describe, plan_regions, write_regions
from simulations.experiment.plan import (ExperimentPreset, Plan, TrainRun, caption_note, eps_label, make_plan,
                                         summary)
from simulations.experiment.report import write_outputs

#: Written into a run's folder when it finished: its settings (:func:`run_stamp`) and seconds.
STAMP_FILE = "experiment-run.json"


def dataset_view(dataset: Path, silos: Sequence[str], folder: Path) -> Path:
    """A dataset folder holding only ``silos``: hard links to the catalogue, ``dataset.json``
    and the chosen silo folders' files (a copy across file systems), so the catalogue hash
    and item cache match. Not symlinks: a dataset opens no file outside itself."""
    folder.mkdir(parents=True, exist_ok=True)

    def link(src: Path, dst: Path) -> None:
        if src.is_file() and not dst.exists():
            try:
                os.link(src.resolve(), dst)
            except OSError:
                shutil.copy2(src, dst)

    for name in ("items.csv", "items.csv.gz", "dataset.json"):
        link(dataset / name, folder / name)
    for s in silos:
        (folder / "silos" / s).mkdir(parents=True, exist_ok=True)
        for f in sorted((dataset / "silos" / s).iterdir()):
            link(f, folder / "silos" / s / f.name)
    return folder


def run_stamp(run: TrainRun, plan: Plan) -> dict[str, Any]:
    """Everything that decides what a training run produces, as the experiment passes it on."""
    overrides = plan.preset.overrides
    return {"key": run.key, "kind": run.kind, "silos": list(run.silos), "dp": run.dp, "epsilon": run.epsilon,
            "overrides": {k: overrides[k] for k in sorted(overrides)}, "dataset": str(plan.dataset),
            "base-model": plan.base_model}


def finished_seconds(run_dir: Path, stamp: Mapping[str, Any]) -> float | None:
    """The recorded training seconds when ``run_dir`` holds a finished run with ``stamp`` and a
    checkpoint; None otherwise (missing, unreadable, other settings, no checkpoint)."""
    try:
        rec = json.loads((run_dir / STAMP_FILE).read_text(encoding="utf-8"))
        last_checkpoint(run_dir)
    except (OSError, ValueError):
        return None
    if rec.get("stamp") != json.loads(json.dumps(stamp)):
        return None
    return float(rec.get("seconds", 0.0))


def run_config(run: TrainRun, plan: Plan, dataset: Path) -> RunConfig:
    """The typed config of one training run: the preset's, on ``dataset`` (the whole dataset or
    the run's view), with the run's privacy; a federated run waits for each of its silos."""
    values: dict[str, Any] = {"dataset": str(dataset.resolve())}
    if plan.base_model:
        values["base-model"] = plan.base_model
    if run.kind == "federated":
        values |= {"dp": True, "epsilon": float(run.epsilon)} if run.dp else {"dp": False}  # type: ignore[arg-type]
        values["min-nodes"] = len(run.silos)
    else:
        values["dp"] = False
    return plan.preset.config().replace(**values)


def train(run: TrainRun, plan: Plan, out: Path, timeout: int) -> None:
    """Train one run into ``OUT/runs/<key>`` (``RuntimeError`` when a simulation does not complete)."""
    run_dir = out / "runs" / run.key
    if run.kind == "centralised":
        cfg = run_config(run, plan, plan.dataset)
        if cfg.user_tower == "sequence":  # the converged ceiling (simulations/experiment/ceiling.py)
            from simulations.experiment.ceiling import CeilingBudget, train_ceiling

            budget = CeilingBudget(plan.preset.ceiling_epochs, plan.preset.ceiling_patience, plan.preset.ceiling_lrs)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "ceiling.log", "w", encoding="utf-8") as log:  # each epoch's line, as it ends

                def say(msg: str) -> None:
                    log.write(f"{msg}\n")
                    log.flush()

                train_ceiling(cfg, run_dir, progress=say, budget=budget)
            return
        from simulations.experiment.centralised import train_centralised

        train_centralised(cfg, run_dir)
        return
    from fedshift.simulation import run_simulation

    data = plan.dataset if len(run.silos) == len(plan.silos) else dataset_view(plan.dataset, run.silos,
                                                                               out / "views" / run.key)
    cfg = run_config(run, plan, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "simulate.log", "w", encoding="utf-8") as log:
        changed = {k: v for k, v in cfg.to_run_config().items() if v != getattr(RunConfig(), k.replace("-", "_"))}
        log.write(f"run_simulation {run.key}: {json.dumps(changed)}\n")
        log.flush()
        # The experiment is local and owns the silos' side too: their policies allow its
        # non-private baselines, and their secrets come from the run seed so figures reproduce.
        result = run_simulation(cfg, run_dir, timeout=timeout, stream=log, allow_non_private=not cfg.dp,
                                silo_seed=f"experiment-{cfg.seed}", check_data=False)  # validated once, up front
    if not result.ok:
        raise RuntimeError(f"run {run.key}: the simulation ended with status {result.status!r}; see "
                           f"{run_dir / 'simulate.log'}")
    from shared_model.run_health import run_problems

    if problems := run_problems(result.metrics):
        raise RuntimeError(f"run {run.key}: {len(problems)} problem(s), first: {problems[0]}; see {result.metrics}")


def run_experiment(preset: ExperimentPreset, out: Path, dataset: Path | None = None, base_model: str | None = None,
                   timeout: int = 3600, log: Callable[[str], None] = print, dry_run: bool = False,
                   resume: bool = False, layout: str = "platforms", notes: Sequence[str] = ()) -> dict[str, Any]:
    """Train every run of the plan, evaluate every method, write the results into ``out``.

    ``dataset``: the folder of the chosen layout (``layout``, recorded; resolved by the caller
    with :func:`shared_model.dataset.layout_dir`). On a dataset with region silos every run gets
    ``other-platform-lags`` (:func:`shared_model.dataset.with_region_defaults`) unless the
    preset's overrides set it, and the unequal re-partition (``small_region_share``) is refused.
    ``notes``: the caller's notes on the settings, recorded with the plan's.
    ``resume``: a run whose folder records (:data:`STAMP_FILE`) that it finished with the same
    settings (:func:`run_stamp`) is reused instead of retrained; evaluation always reruns."""
    from shared_model.layouts import has_region_silos, with_region_defaults

    out = Path(out).resolve()
    started = time.time()

    def clock() -> str:
        return f"[{time.time() - started:6.0f} s]"

    generated = dataset is None and preset.generated is not None
    if not generated:
        dataset = Path(dataset).expanduser().resolve() if dataset else RunConfig().dataset_dir()
    if not generated and preset.small_region_share is not None and has_region_silos(Path(dataset)):
        raise ValueError(f"{dataset} has region silos (several platforms in a silo); the unequal re-partition "
                         "(small-region share) handles one-platform silos only: train on its own silos (--keep-regions)")
    # a bad share or a platform too small for two regions fails before anything is written
    regions = plan_regions(Path(dataset), preset.small_region_share, preset.seed) if (
        preset.small_region_share is not None and not generated) else None
    if not generated:  # every bad file:line of the dataset, before the output folder exists
        from shared_model.dataset import require_valid_dataset

        require_valid_dataset(Path(dataset))
    out.mkdir(parents=True, exist_ok=True)
    if generated:
        dataset, base_model = _generated_inputs(preset, out, base_model)
        if preset.small_region_share is not None:
            regions = plan_regions(Path(dataset), preset.small_region_share, preset.seed)
    source = dataset = Path(dataset).resolve()
    if regions is not None:
        dataset = write_regions(regions, out / "views" / f"small-region-{eps_label(regions.share)}")
    base_model = str(Path(base_model).expanduser().resolve()) if base_model else None
    # region silos: every run (federated, local-only, centralised) reads mixed histories per platform
    preset = replace(preset, overrides=with_region_defaults(preset.overrides, dataset))
    plan = make_plan(preset, dataset, base_model)
    cfg = preset.config()
    notes = [*notes, *plan.notes]
    log(f"fedshift experiment: preset {preset.name} ({summary(preset)})")
    if regions is not None:
        log(f"unequal silos: {source} re-partitioned into {dataset} (small region ≈{regions.share:g} of each "
            f"platform's users, by a hash of the user id): {describe(regions)}")
    log(f"dataset {dataset} ({len(plan.silos)} silos: {', '.join(f'{s}={p}' for s, p in plan.silos.items())}); "
        f"base model {base_model or 'bundled'}; {cfg.num_server_rounds} round(s) × {cfg.local_steps} local steps; "
        f"split {preset.split}; layout {layout}" + (f"; other-platform-lags {cfg.other_platform_lags}"
                                                    if "other-platform-lags" in preset.overrides else ""))
    for note in notes:
        log(f"note: {note}")
    log(f"{len(plan.runs)} training runs, {len(plan.methods)} methods; estimated time "
        f"{plan.estimate_s() / 60:.1f} min (item-index embedding of the catalogue not included when uncached):")
    for r in plan.runs.values():
        log(f"  {r.key:<34} {len(r.silos)} silo(s), {'DP ε=%g' % r.epsilon if r.dp else 'no DP'}: ≈{r.estimate_s:.0f} s")
    log(f"  evaluation: ≈{sum(plan.eval_estimate(m) for m in plan.methods):.0f} s")
    if plan.curve_methods:
        log(f"  learning curves ({', '.join(plan.curve_methods)}; {plan.curve_users} validation users, every round's "
            f"checkpoint): ≈{plan.curve_estimate_s():.0f} s")
    if dry_run:
        return {"plan": plan}

    for n, run in enumerate(plan.runs.values(), 1):
        t0 = time.time()
        run_dir = out / "runs" / run.key
        stamp = run_stamp(run, plan)
        if resume and (seconds := finished_seconds(run_dir, stamp)) is not None:
            run.seconds, run.status = seconds, "reused"
            log(f"{clock()} run {n}/{len(plan.runs)} {run.key}: reused (finished, same settings; trained in "
                f"{seconds:.0f} s)")
            continue
        log(f"{clock()} run {n}/{len(plan.runs)} {run.key} (≈{run.estimate_s:.0f} s) …")
        (run_dir / STAMP_FILE).unlink(missing_ok=True)
        train(run, plan, out, timeout)
        run.seconds, run.status = time.time() - t0, "done"
        write_bytes_atomic(run_dir / STAMP_FILE, json.dumps(
            {"stamp": stamp, "seconds": round(run.seconds, 1),
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2).encode())
        log(f"{clock()} run {n}/{len(plan.runs)} {run.key} done in {run.seconds:.0f} s")

    evaluated = evaluate_plan(plan, out, log, clock)
    curves = plan_curves(plan, out, evaluated["catalogue"], evaluated["silos"], evaluated["k"], log, clock)
    doc = {
        "preset": preset.name,
        "summary": summary(preset),
        "subsampling": caption_note(preset),
        "dataset": str(dataset),
        "source-dataset": str(source),
        "layout": layout,
        "notes": notes,
        "regions": regions.record if regions is not None else None,
        "base-model": base_model or "bundled all-MiniLM-L6-v2",
        "split": preset.split,
        "bootstrap-reps": preset.bootstrap,
        "seed": preset.seed,
        "max-users": preset.max_users,
        "reference": "most-popular",
        "users": evaluated["users"],
        "overrides": preset.overrides,
        "training": {"num-server-rounds": cfg.num_server_rounds, "local-steps": cfg.local_steps,
                     "batch-size": cfg.batch_size, "max-seq-len": cfg.max_seq_len, "delta": cfg.delta,
                     "user-tower": cfg.user_tower, "max-history": cfg.max_history},
        "runs": {k_: {"silos": list(r.silos), "dp": r.dp, "epsilon": r.epsilon, "seconds": round(r.seconds, 1),
                      "estimate-seconds": round(r.estimate_s, 1), "status": r.status} for k_, r in plan.runs.items()},
        "methods": evaluated["methods"],
        "curves": {key: round_curves(out / "runs" / key) for key, r in plan.runs.items() if r.kind == "federated"},
        "per-silo": evaluated["per-silo"],
        "learning-curves": curves,
        "estimate-seconds": {"total": round(plan.estimate_s(), 1), "learning-curves": round(plan.curve_estimate_s(), 1)},
        "machine": machine_description(),
        "seconds": round(time.time() - started, 1),
    }
    written = write_outputs(doc, out)
    log(f"{clock()} wrote {out / 'results.md'}, results.csv, results.json and {len(written)} plots "
        f"({', '.join(written)})")
    return doc


def _generated_inputs(preset: ExperimentPreset, out: Path, base_model: str | None) -> tuple[Path, str]:
    from shared_model.encoder import write_tiny_bert
    from simulations.datasets.generator import generate

    data = out / "smoke-data"
    if not (data / "silos").is_dir():
        generate(data, **dict(preset.generated or {}))
    if base_model is None:
        bert = out / "tiny-bert"
        if not (bert / "config.json").is_file():
            write_tiny_bert(bert, seed=0)
        base_model = str(bert)
    return data, base_model


def machine_description() -> str:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform_mod.machine()} {platform_mod.system()}, {cores} CPU cores available, {dev}, torch {torch.__version__}"
