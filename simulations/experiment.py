"""The experiment grid of ``fedshift experiment``: every method trained and evaluated in one
harness, on one split, on the same users, with 95 % paired-bootstrap intervals.

Methods (rows of ``results.md`` / ``results.csv``):

* ``most-popular``, ``category-markov``, ``item-cooccurrence``: the non-learned baselines
  of :mod:`simulations.baselines` (fitted on the train split of every silo; centralised,
  so not private: ε = ∞).
* ``federated-dp-eps{ε}``: ``fedshift simulate`` on every silo with total budget ε per silo
  (``--epsilon``); the last round's checkpoint is evaluated.
* ``federated-nonprivate``: the same with ``--no-dp``.
* ``local-only``: one ``fedshift simulate`` per silo on a dataset *view* holding only that
  silo (``min-nodes=1``), same ε and config as the federated runs. Each held-out user is
  scored by the model of **their own silo**; a platform's row pools its silos' users
  (each scored by their silo's model), ``overall`` pools all platforms.
* ``centralised-nonprivate``: :mod:`simulations.centralised` (all silos' training users
  pooled, no DP, the same number of gradient steps as all silos of a federated run).
* ``lopo-{A}-to-{B}``: leave-one-platform-out — federated DP (the local-only ε) on a view
  with only platform A's silos, evaluated on platform B's held-out users (zero-shot
  transfer through the text encoder: the model never saw a B event; the input is each
  user's B history).

Two training runs with the same silos and overrides are run once and shared (with one
region per platform, the local-only run of a platform's only silo *is* its LOPO run).

Evaluation: :func:`simulations.evaluation.per_user` / :func:`summarise` (full ranking,
history items excluded, category accuracy, migration AUC) on the held-out users of
``split`` per platform (optionally a seeded subset of ``max-users`` per platform, the same
users for every method) and ``overall``; every metric has a 95 % percentile interval from
a bootstrap over users with the same draws for every method of a group (paired), and
``Δ NDCG@10`` is each method minus ``most-popular`` per user with its paired interval.
Nothing is tuned: every hyper-parameter is fixed by the preset before the run; the
validation split is only used for the per-round curves (``metric-vs-round.png``, from
each federated run's ``metrics.json``), the test split only for the table.
"""

from __future__ import annotations

import json
import math
import os
import platform as platform_mod
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.io_utils import csv_bytes, write_bytes_atomic

REFERENCE = "most-popular"
#: The next-interest reference: every method's category metrics also get a paired Δ to it.
INTEREST_REFERENCE = "category-markov"
INTEREST_DELTAS = ("category-acc1", "category-acc3", "new-interest-acc1-migrating")
TABLE_METRICS = (("hr10", "HR@10"), ("ndcg10", "NDCG@10"), ("mrr", "MRR"), ("category-acc1", "cat acc@1"),
                 ("category-acc3", "cat acc@3"), ("category-acc1-migrating", "cat acc@1 migrating"),
                 ("new-interest-acc1-migrating", "new-interest acc@1 migrating"), ("migration-auc", "migration AUC"))
ALL_METRICS = ("hr10", "ndcg10", "mrr", "category-acc1", "category-acc3", "category-acc1-migrating",
               "category-acc3-migrating", "new-interest-acc1-migrating", "migration-auc", "migration-auc-mass")
DELTA_COLUMNS = ("delta-ndcg10", "delta-category-acc1", *(f"delta-markov-{m}" for m in INTEREST_DELTAS))


@dataclass(frozen=True)
class ExperimentPreset:
    """One grid: what to train, how long, and how to evaluate."""

    name: str
    summary: str
    overrides: dict[str, Any]  # run-config overrides of every training run
    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0)
    local_epsilon: float = 8.0  # ε of local-only and leave-one-platform-out runs
    federated_nonprivate: bool = True
    local_only: bool = True
    centralised: bool = True
    lopo: bool = True
    split: str = "test"
    max_users: int = 0  # per platform group; 0 = every held-out user
    bootstrap: int = 1000
    seed: int = 0
    generated: dict[str, Any] | None = None  # smoke: generate a dataset + tiny BERT when none is given
    subsampling: str = ""
    # time model (seconds): per simulation overhead, per silo-step, per silo-round evaluation,
    # and a full evaluation of one checkpoint on every held-out user of the split
    sim_overhead_s: float = 35.0
    step_s: float = 1.2
    silo_eval_s: float = 4.0
    full_eval_s: float = 60.0


EXPERIMENT_PRESETS: dict[str, ExperimentPreset] = {
    "smoke": ExperimentPreset(
        name="smoke",
        summary="mechanics only: generated 2-platform data (unless --dataset), tiny BERT, 1 round × 2 steps",
        overrides={"num-server-rounds": 1, "local-steps": 2, "batch-size": 16, "max-eval-users": 16},
        epsilons=(8.0,),
        local_epsilon=8.0,
        federated_nonprivate=False,  # the same code path as federated DP (--no-dp); saves one simulation
        bootstrap=100,
        generated={"users": 160, "platforms": 2, "regions": 1, "seed": 1},
        subsampling="smoke preset: generated data, random tiny BERT, 1 round × 2 steps; numbers are meaningless",
        sim_overhead_s=35.0, step_s=0.1, silo_eval_s=1.0, full_eval_s=5.0,
    ),
    "paper": ExperimentPreset(
        name="paper",
        summary="bundled Amazon arts/office data, bundled all-MiniLM-L6-v2; 3 rounds × 16 DP-SGD steps per silo",
        overrides={"num-server-rounds": 3, "local-steps": 16, "batch-size": 32, "max-seq-len": 64,
                   "max-eval-users": 128},
        epsilons=(1.0, 4.0, 8.0),
        local_epsilon=8.0,
        bootstrap=1000,
        subsampling=("training budget subsampled to fit 60 min on 2 CPU cores: 3 rounds × 16 DP-SGD steps "
                     "× batch 32 per silo (Poisson-sampled users, one random history cut per user and "
                     "step), histories truncated to 64 tokens, per-round validation on ≤128 users per "
                     "silo; the test table uses every held-out test user"),
    ),
}


# ---------------------------------------------------------------------------------------------
# plan


@dataclass
class TrainRun:
    """One training run (a ``fedshift simulate`` or the centralised trainer)."""

    key: str  # folder name under OUT/runs
    kind: str  # "federated" | "centralised"
    silos: tuple[str, ...]
    dp: bool
    epsilon: float | None
    estimate_s: float = 0.0
    seconds: float = 0.0
    status: str = "pending"


@dataclass
class Method:
    """One row family: which run(s) provide the model for which groups."""

    name: str
    family: str  # baseline | federated-dp | federated-nonprivate | local-only | centralised | lopo
    runs: tuple[str, ...] = ()  # TrainRun keys; local-only: one per silo
    epsilon: float | None = None  # None = not private (∞)
    train_platforms: tuple[str, ...] = ()
    eval_platforms: tuple[str, ...] | None = None  # None = every platform + overall
    silo_of_run: dict[str, str] = field(default_factory=dict)  # local-only: silo -> run key


@dataclass
class Plan:
    preset: ExperimentPreset
    dataset: Path
    base_model: str | None
    silos: dict[str, str]  # silo -> platform
    runs: dict[str, TrainRun]
    methods: list[Method]

    def estimate_s(self) -> float:
        return sum(r.estimate_s for r in self.runs.values()) + sum(self.eval_estimate(m) for m in self.methods)

    def eval_estimate(self, m: Method) -> float:
        if m.family == "baseline":
            return 2.0
        if m.eval_platforms is None:
            return self.preset.full_eval_s
        share = sum(1 for p in self.silos.values() if p in m.eval_platforms) / max(len(self.silos), 1)
        return self.preset.full_eval_s * share


def _cfg(preset: ExperimentPreset) -> tuple[int, int]:
    from shared_model.config import RunConfig

    cfg = RunConfig.from_run_config({**RunConfig().to_run_config(), **preset.overrides})
    return cfg.num_server_rounds, cfg.local_steps


def _eps_label(eps: float) -> str:
    return f"{eps:g}".replace(".", "p")


def make_plan(preset: ExperimentPreset, dataset: Path, base_model: str | None) -> Plan:
    from shared_model.dataset import list_silos, load_catalogue, load_silo

    catalogue = load_catalogue(dataset)
    silos = {s: load_silo(dataset / "silos" / s, catalogue).platform for s in list_silos(dataset)}
    platforms = [p for p in catalogue.platforms if p in silos.values()]
    rounds, steps = _cfg(preset)
    runs: dict[str, TrainRun] = {}
    methods: list[Method] = [Method(n, "baseline") for n in ("most-popular", "category-markov", "history-logit",
                                                             "item-cooccurrence")]

    def fed_run(subset: Sequence[str], dp: bool, eps: float | None) -> str:
        subset = tuple(sorted(subset))
        tag = "all" if len(subset) == len(silos) else "+".join(subset)
        key = f"fed-{tag}-" + (f"eps{_eps_label(eps)}" if dp and eps is not None else "nodp")
        if key not in runs:
            est = preset.sim_overhead_s + len(subset) * (rounds * (steps * preset.step_s + preset.silo_eval_s)
                                                          + preset.silo_eval_s)
            runs[key] = TrainRun(key, "federated", subset, dp, eps if dp else None, estimate_s=est)
        return key

    everyone = tuple(sorted(silos))
    for eps in preset.epsilons:
        methods.append(Method(f"federated-dp-eps{eps:g}", "federated-dp", (fed_run(everyone, True, eps),), eps,
                              tuple(platforms)))
    if preset.federated_nonprivate:
        methods.append(Method("federated-nonprivate", "federated-nonprivate", (fed_run(everyone, False, None),),
                              None, tuple(platforms)))
    if preset.local_only:
        per = {s: fed_run((s,), True, preset.local_epsilon) for s in everyone}
        methods.append(Method(f"local-only-eps{preset.local_epsilon:g}", "local-only", tuple(per.values()),
                              preset.local_epsilon, tuple(platforms), silo_of_run=per))
    if preset.centralised:
        est = 20.0 + len(silos) * rounds * steps * preset.step_s * 0.6  # no per-sample gradients
        runs["centralised"] = TrainRun("centralised", "centralised", everyone, False, None, estimate_s=est)
        methods.append(Method("centralised-nonprivate", "centralised", ("centralised",), None, tuple(platforms)))
    if preset.lopo and len(platforms) > 1:
        for a in platforms:
            key = fed_run([s for s, p in silos.items() if p == a], True, preset.local_epsilon)
            for b in platforms:
                if b != a:
                    methods.append(Method(f"lopo-{a}-to-{b}-eps{preset.local_epsilon:g}", "lopo", (key,),
                                          preset.local_epsilon, (a,), eval_platforms=(b,)))
    return Plan(preset, dataset, base_model, silos, runs, methods)


# ---------------------------------------------------------------------------------------------
# training


def dataset_view(dataset: Path, silos: Sequence[str], folder: Path) -> Path:
    """A dataset folder holding only ``silos``: symlinks to the catalogue, ``dataset.json``
    and the chosen silo folders (nothing copied, so the catalogue hash and item cache match)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("items.csv", "items.csv.gz", "dataset.json"):
        src = dataset / name
        if src.is_file() and not (folder / name).exists():
            (folder / name).symlink_to(src.resolve())
    (folder / "silos").mkdir(exist_ok=True)
    for s in silos:
        link = folder / "silos" / s
        if not link.exists():
            link.symlink_to((dataset / "silos" / s).resolve(), target_is_directory=True)
    return folder


#: Written into a run's folder when it finished: its settings (:func:`run_stamp`) and seconds.
STAMP_FILE = "experiment-run.json"


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


def _simulate(run: TrainRun, plan: Plan, out: Path, timeout: int) -> None:
    run_dir = out / "runs" / run.key
    data = plan.dataset if len(run.silos) == len(plan.silos) else dataset_view(plan.dataset, run.silos,
                                                                               out / "views" / run.key)
    cmd = [sys.executable, "-m", "fedshift.cli", "simulate", "--out", str(run_dir), "--dataset", str(data),
           "--timeout", str(timeout)]
    if plan.base_model:
        cmd += ["--base-model", plan.base_model]
    if run.dp:
        cmd += ["--epsilon", repr(float(run.epsilon))]  # type: ignore[arg-type]
    else:
        cmd += ["--no-dp"]
    for k, v in sorted(plan.preset.overrides.items()):
        cmd += ["--set", f"{k}={v}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "simulate.log", "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout + 120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run.key}: fedshift simulate exited {proc.returncode}; see {run_dir / 'simulate.log'}")


def _centralised(run: TrainRun, plan: Plan, out: Path) -> None:
    from shared_model.config import RunConfig
    from simulations.centralised import train_centralised

    overrides = {**plan.preset.overrides, "dataset": str(plan.dataset), "dp": False}
    if plan.base_model:
        overrides["base-model"] = plan.base_model
    cfg = RunConfig.from_run_config({**RunConfig().to_run_config(), **overrides})
    train_centralised(cfg, out / "runs" / run.key)


def last_checkpoint(run_dir: Path) -> Path:
    found = sorted((run_dir / "checkpoints").glob("round-*"))
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no checkpoint")
    return found[-1]


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass
class Group:
    platform: str
    cases: list[Any]
    silo: list[str]  # silo of each case (for local-only routing)


def build_groups(catalogue: Any, silos: Mapping[str, Any], split: str, k: int, max_users: int,
                 seed: int) -> dict[str, Group]:
    """Per platform: held-out users of every silo of that platform (silos in name order, as
    :func:`simulations.evaluation.platform_cases`), optionally a seeded subset."""
    from simulations.evaluation import platform_cases

    rng = np.random.default_rng(seed)
    groups: dict[str, Group] = {}
    for p in catalogue.platforms:
        cases, owner = [], []
        for name in sorted(silos):
            if silos[name].platform == p:
                got = platform_cases(catalogue, {name: silos[name]}, p, split, k)
                cases += got
                owner += [name] * len(got)
        if not cases:
            continue
        if max_users and len(cases) > max_users:
            keep = sorted(rng.choice(len(cases), size=max_users, replace=False).tolist())
            cases, owner = [cases[i] for i in keep], [owner[i] for i in keep]
        groups[p] = Group(p, cases, owner)
    return groups


def build_cross_groups(catalogue: Any, silos: Mapping[str, Any], split: str, max_users: int,
                       seed: int) -> dict[str, Group]:
    """``A->B`` for every ordered pair of platforms: held-out users of B whose input is only
    their earlier events on A (:func:`simulations.evaluation.cross_cases`), optionally a
    seeded subset."""
    from simulations.evaluation import cross_cases

    rng = np.random.default_rng(seed + 1)
    groups: dict[str, Group] = {}
    for a in catalogue.platforms:
        for b in catalogue.platforms:
            if a == b:
                continue
            cases = cross_cases(catalogue, silos, a, b, split)
            if max_users and len(cases) > max_users:
                keep = sorted(rng.choice(len(cases), size=max_users, replace=False).tolist())
                cases = [cases[i] for i in keep]
            if cases:
                groups[f"{a}->{b}"] = Group(f"{a}->{b}", cases, [""] * len(cases))
    return groups


def evaluate_cross(pred: Any, cross: Mapping[str, Group], catalogue: Any, k: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-user results of one predictor on each cross-platform group (ranked on the target platform)."""
    from simulations.evaluation import per_user

    categories = catalogue.interest_vocab()
    return {g: per_user(pred, grp.cases, g.split("->")[1], catalogue, categories, k) for g, grp in cross.items()}


class RoutedPredictor:
    """Local-only: each case is scored by the model of its own silo."""

    def __init__(self, name: str, scorers: Mapping[str, Any], owner: Mapping[int, str]):
        from simulations.evaluation import ModelPredictor

        self.name = name
        self.models = {s: ModelPredictor(sc, s) for s, sc in scorers.items()}
        self.owner = owner  # id(case) -> silo

    def predict(self, cases: Sequence[Any], platform: str) -> tuple[np.ndarray, np.ndarray]:
        scores: list[Any] = [None] * len(cases)
        probs: list[Any] = [None] * len(cases)
        by_silo: dict[str, list[int]] = {}
        for i, c in enumerate(cases):
            by_silo.setdefault(self.owner[id(c)], []).append(i)
        for silo, idx in by_silo.items():
            s, p = self.models[silo].predict([cases[i] for i in idx], platform)
            for j, i in enumerate(idx):
                scores[i], probs[i] = np.asarray(s[j]), np.asarray(p[j])
        return np.stack(scores), np.stack(probs)


def evaluate_method(pred: Any, groups: Mapping[str, Group], platforms: Sequence[str], catalogue: Any,
                    k: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-user results of one predictor on each of ``platforms``' groups."""
    from simulations.evaluation import per_user

    categories = catalogue.interest_vocab()
    per: dict[str, dict[str, np.ndarray]] = {}
    for p in platforms:
        if p in groups:
            per[p] = per_user(pred, groups[p].cases, p, catalogue, categories, k)
    return per


def summarise_all(per: Mapping[str, dict[str, np.ndarray]], ref: Mapping[str, dict[str, np.ndarray]] | None,
                  overall: bool, reps: int, seed: int, cross: Mapping[str, dict[str, np.ndarray]] | None = None,
                  interest_ref: Mapping[str, dict[str, np.ndarray]] | None = None) -> dict[str, dict[str, Any]]:
    """Each group's metrics (and overall when asked) with paired intervals, Δ to the reference
    (``delta-*``) and, for the next-interest metrics, Δ to :data:`INTEREST_REFERENCE` (``delta-markov-*``)."""
    from simulations.evaluation import DIFFERENCE_METRICS, concat, group_seed, summarise
    from simulations.stats import paired_difference

    groups = dict(per)
    if overall and len(per) > 1:
        groups["overall"] = concat(list(per.values()))
    elif overall and len(per) == 1:
        groups["overall"] = next(iter(per.values()))
    groups.update(cross or {})
    out: dict[str, dict[str, Any]] = {}
    for g, u in groups.items():
        est = {m: e.as_dict() for m, e in summarise(u, reps, group_seed(seed, g), migration="->" not in g).items()}
        if ref is not None and g in ref:
            for m in ("ndcg10", "category-acc1"):
                f = DIFFERENCE_METRICS[m]
                est[f"delta-{m}"] = paired_difference(f(u), f(ref[g]), reps, group_seed(seed, g)).as_dict()
        if interest_ref is not None and g in interest_ref and "->" not in g:
            for m in INTEREST_DELTAS:
                f = DIFFERENCE_METRICS[m]
                est[f"delta-markov-{m}"] = paired_difference(f(u), f(interest_ref[g]), reps,
                                                             group_seed(seed, g)).as_dict()
        out[g] = {"users": int(len(u["rank"])), "metrics": est}
    return out


def _spent_epsilon(run_dir: Path) -> float | None:
    """Largest cumulative ε any silo reached in a federated run (from metrics.json)."""
    p = run_dir / "metrics.json"
    if not p.is_file():
        return None
    doc = json.loads(p.read_text())
    eps = [r.get("epsilon") for r in doc.get("records", []) if r.get("phase") == "train"]
    eps = [float(e) for e in eps if isinstance(e, (int, float)) and math.isfinite(float(e))]
    return max(eps) if eps else None


def _round_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Validation metrics of the ``ALL`` row (every silo pooled) per round of a federated run."""
    p = run_dir / "metrics.json"
    if not p.is_file():
        return {}
    doc = json.loads(p.read_text())
    out: dict[str, list[tuple[int, float]]] = {}
    for r in doc.get("records", []):
        if r.get("phase") == "evaluate" and r.get("silo") == "ALL":
            for m in ("ndcg10", "category-accuracy", "category-accuracy-migrating"):
                v = r.get(m)
                if isinstance(v, (int, float)) and v >= 0:
                    out.setdefault(m, []).append((int(r["round"]), float(v)))
    return {m: sorted(v) for m, v in out.items()}


# ---------------------------------------------------------------------------------------------
# driver


def run_experiment(preset: ExperimentPreset, out: Path, dataset: Path | None = None, base_model: str | None = None,
                   timeout: int = 3600, log: Callable[[str], None] = print, dry_run: bool = False,
                   resume: bool = False) -> dict[str, Any]:
    """Train every run of the plan, evaluate every method, write the results into ``out``.

    ``resume``: a run whose folder records (:data:`STAMP_FILE`) that it finished with the same
    settings (:func:`run_stamp`) is reused instead of retrained; evaluation always reruns."""
    from shared_model.config import RunConfig

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if dataset is None and preset.generated is not None:
        dataset, base_model = _generated_inputs(preset, out, base_model)
    dataset = Path(dataset).expanduser().resolve() if dataset else RunConfig().dataset_dir()
    base_model = str(Path(base_model).expanduser().resolve()) if base_model else None
    plan = make_plan(preset, dataset, base_model)
    rounds, steps = _cfg(preset)
    log(f"fedshift experiment: preset {preset.name} ({preset.summary})")
    log(f"dataset {dataset} ({len(plan.silos)} silos: {', '.join(f'{s}={p}' for s, p in plan.silos.items())}); "
        f"base model {base_model or 'bundled'}; {rounds} rounds × {steps} steps; split {preset.split}")
    log(f"{len(plan.runs)} training runs, {len(plan.methods)} methods; estimated time "
        f"{plan.estimate_s() / 60:.1f} min (item-index embedding of the catalogue not included when uncached):")
    for r in plan.runs.values():
        log(f"  {r.key:<34} {len(r.silos)} silo(s), {'DP ε=%g' % r.epsilon if r.dp else 'no DP'}: ≈{r.estimate_s:.0f} s")
    log(f"  evaluation: ≈{sum(plan.eval_estimate(m) for m in plan.methods):.0f} s")
    if dry_run:
        return {"plan": plan}

    # 1. training
    for n, run in enumerate(plan.runs.values(), 1):
        t0 = time.time()
        run_dir = out / "runs" / run.key
        stamp = run_stamp(run, plan)
        if resume and (seconds := finished_seconds(run_dir, stamp)) is not None:
            run.seconds, run.status = seconds, "reused"
            log(f"[{time.time() - started:6.0f} s] run {n}/{len(plan.runs)} {run.key}: reused (finished, same "
                f"settings; trained in {seconds:.0f} s)")
            continue
        log(f"[{time.time() - started:6.0f} s] run {n}/{len(plan.runs)} {run.key} (≈{run.estimate_s:.0f} s) …")
        (run_dir / STAMP_FILE).unlink(missing_ok=True)
        if run.kind == "federated":
            _simulate(run, plan, out, timeout)
        else:
            _centralised(run, plan, out)
        run.seconds, run.status = time.time() - t0, "done"
        write_bytes_atomic(run_dir / STAMP_FILE, json.dumps(
            {"stamp": stamp, "seconds": round(run.seconds, 1),
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2).encode())
        log(f"[{time.time() - started:6.0f} s] run {n}/{len(plan.runs)} {run.key} done in {run.seconds:.0f} s")

    # 2. evaluation on the held-out split
    from shared_model.dataset import load_dataset, load_dataset_info
    from shared_model.examples import DEFAULT_K
    from shared_model.scoring import Scorer
    from simulations.baselines import all_baselines
    from simulations.evaluation import ModelPredictor

    catalogue, silos = load_dataset(dataset)
    k = int(load_dataset_info(dataset).get("migration_k", DEFAULT_K))
    platforms = [p for p in catalogue.platforms if p in plan.silos.values()]
    groups = build_groups(catalogue, silos, preset.split, k, preset.max_users, preset.seed)
    owner = {id(c): s for g in groups.values() for c, s in zip(g.cases, g.silo)}
    baselines = {b.name: b for b in all_baselines(catalogue, silos)}
    reps, seed = preset.bootstrap, preset.seed
    ref_per = evaluate_method(baselines[REFERENCE], groups, platforms, catalogue, k)
    ref_all = {**ref_per}
    from simulations.evaluation import concat

    ref_all["overall"] = concat([ref_per[p] for p in platforms if p in ref_per])
    cross = build_cross_groups(catalogue, silos, preset.split, preset.max_users, preset.seed)
    cross = {g: grp for g, grp in cross.items() if all(p in platforms for p in g.split("->"))}
    ref_all.update(evaluate_cross(baselines[REFERENCE], cross, catalogue, k))
    markov_per = evaluate_method(baselines[INTEREST_REFERENCE], groups, platforms, catalogue, k)
    markov_all = {**markov_per, "overall": concat([markov_per[p] for p in platforms if p in markov_per])}
    results: dict[str, Any] = {}
    for n, m in enumerate(plan.methods, 1):
        t0 = time.time()
        evals = list(m.eval_platforms) if m.eval_platforms else platforms
        if m.family == "baseline":
            pred: Any = baselines[m.name]
        elif m.family == "local-only":
            scorers = {s: Scorer.from_checkpoint(last_checkpoint(out / "runs" / key), dataset, base_model)
                       for s, key in m.silo_of_run.items()}
            pred = RoutedPredictor(m.name, scorers, owner)
        else:
            pred = ModelPredictor(Scorer.from_checkpoint(last_checkpoint(out / "runs" / m.runs[0]), dataset,
                                                         base_model), m.name)
        per = (ref_per if m.name == REFERENCE else markov_per if m.name == INTEREST_REFERENCE
               else evaluate_method(pred, groups, evals, catalogue, k))
        per = {p: u for p, u in per.items() if p in evals}
        # cross-platform groups: every method trained on both platforms' silos with one model
        # (not local-only: a silo model never saw the other platform; not LOPO: it is its own transfer row)
        per_cross = None
        if m.family not in {"local-only", "lopo"}:
            per_cross = ({g: ref_all[g] for g in cross} if m.name == REFERENCE
                         else evaluate_cross(pred, cross, catalogue, k))
        summary = summarise_all(per, None if m.name == REFERENCE else ref_all, m.eval_platforms is None, reps, seed,
                                per_cross, None if m.name == INTEREST_REFERENCE else markov_all)
        spent = None
        if m.family in {"federated-dp", "lopo"}:
            spent = _spent_epsilon(out / "runs" / m.runs[0])
        elif m.family == "local-only":
            vals = [v for v in (_spent_epsilon(out / "runs" / key) for key in m.runs) if v is not None]
            spent = max(vals) if vals else None
        results[m.name] = {"family": m.family, "epsilon": m.epsilon, "epsilon-spent": spent,
                           "delta": _delta(preset) if m.epsilon is not None else None,
                           "train-platforms": list(m.train_platforms), "runs": list(m.runs), "groups": summary}
        del pred
        log(f"[{time.time() - started:6.0f} s] evaluated {n}/{len(plan.methods)} {m.name} in {time.time() - t0:.0f} s")

    curves = {key: _round_curves(out / "runs" / key) for key, r in plan.runs.items() if r.kind == "federated"}
    doc = {
        "preset": preset.name,
        "summary": preset.summary,
        "subsampling": preset.subsampling,
        "dataset": str(dataset),
        "base-model": base_model or "bundled all-MiniLM-L6-v2",
        "split": preset.split,
        "bootstrap-reps": reps,
        "seed": seed,
        "max-users": preset.max_users,
        "reference": REFERENCE,
        "users": {g: len(v.cases) for g, v in {**groups, **cross}.items()},
        "overrides": preset.overrides,
        "runs": {k_: {"silos": list(r.silos), "dp": r.dp, "epsilon": r.epsilon, "seconds": round(r.seconds, 1),
                      "estimate-seconds": round(r.estimate_s, 1), "status": r.status} for k_, r in plan.runs.items()},
        "methods": results,
        "curves": curves,
        "machine": machine_description(),
        "seconds": round(time.time() - started, 1),
    }
    written = write_outputs(doc, out)
    log(f"[{time.time() - started:6.0f} s] wrote {out / 'results.md'}, results.csv, results.json and "
        f"{len(written)} plots ({', '.join(written)})")
    return doc


def _delta(preset: ExperimentPreset) -> float:
    from shared_model.config import RunConfig

    return RunConfig.from_run_config({**RunConfig().to_run_config(), **preset.overrides}).delta


def _generated_inputs(preset: ExperimentPreset, out: Path, base_model: str | None) -> tuple[Path, str]:
    from shared_model.encoder import write_tiny_bert
    from simulations.generator import generate

    gen = dict(preset.generated or {})
    data = out / "smoke-data"
    if not (data / "silos").is_dir():
        generate(data, **gen)
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


# ---------------------------------------------------------------------------------------------
# outputs


def _main_group(entry: Mapping[str, Any]) -> str:
    groups = entry["groups"]
    return "overall" if "overall" in groups else next(iter(groups))


def _cell(e: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not e or e.get("value") is None:
        return "–"
    lo, hi = e["ci95"]
    fmt = "{:+.3f}" if signed else "{:.3f}"
    ci = f"[{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None else "[–]"
    return f"{fmt.format(e['value'])} {ci}"


def _eps_cells(entry: Mapping[str, Any]) -> tuple[str, str]:
    if entry["epsilon"] is None:
        return "∞ (non-private)", "–"
    spent = entry.get("epsilon-spent")
    eps = f"{entry['epsilon']:g}" + (f" (spent {spent:.2f})" if spent is not None else "")
    return eps, f"{entry['delta']:g}"


def results_rows(doc: Mapping[str, Any]) -> list[list[Any]]:
    """One CSV row per (method, group)."""
    rows = []
    for name, entry in doc["methods"].items():
        for g, res in entry["groups"].items():
            row: list[Any] = [name, entry["family"], "+".join(entry["train-platforms"]) or "all (train split)", g,
                              res["users"],
                              "inf" if entry["epsilon"] is None else entry["epsilon"],
                              "" if entry.get("epsilon-spent") is None else round(entry["epsilon-spent"], 6),
                              "" if entry["delta"] is None else entry["delta"]]
            for m in (*ALL_METRICS, *DELTA_COLUMNS):
                e = res["metrics"].get(m) or {}
                lo, hi = (e.get("ci95") or [None, None])
                row += [_num(e.get("value")), _num(lo), _num(hi), e.get("n", "")]
            rows.append(row)
    return rows


def _num(x: Any) -> Any:
    return "" if x is None else x


def csv_header() -> list[str]:
    head = ["method", "family", "trained-on", "group", "users", "epsilon", "epsilon-spent", "delta"]
    for m in (*ALL_METRICS, *DELTA_COLUMNS):
        head += [m, f"{m}-ci95-low", f"{m}-ci95-high", f"{m}-n"]
    return head


def results_markdown(doc: Mapping[str, Any]) -> str:
    methods = doc["methods"]
    head = ["method", "ε (per silo)", "δ", "evaluated on", "users", *(h for _, h in TABLE_METRICS),
            f"Δ NDCG@10 vs {doc['reference']}"]
    lines = [f"# fedshift experiment — preset `{doc['preset']}`", ""]
    caption = (f"**Table 1.** Next-item and next-interest metrics on the held-out **{doc['split']}** users "
               f"({', '.join(f'{g}: {n}' for g, n in doc['users'].items())}"
               + (f"; a seeded subset of ≤{doc['max-users']} per platform" if doc["max-users"] else "; all of them")
               + f"). Each cell: value [95 % paired-bootstrap interval over users, {doc['bootstrap-reps']} resamples; "
               f"the same draws for every method]. Δ: per-user paired difference to {doc['reference']}. "
               f"ε: each silo's total budget for the run (Opacus RDP; spent = the largest cumulative ε reached); "
               f"non-private methods have ε = ∞. 'overall' pools every platform's users; a leave-one-platform-out "
               f"row is evaluated on the platform it never saw. {doc['subsampling']}. "
               f"No tuning: every hyper-parameter is fixed by the preset; the test split is used only here. "
               f"Machine: {doc['machine']}; wall time {doc['seconds'] / 60:.1f} min.")
    lines += [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in methods.items():
        g = _main_group(entry)
        res = entry["groups"][g]
        eps, delta = _eps_cells(entry)
        cells = [f"`{name}`", eps, delta, g, str(res["users"]),
                 *(_cell(res["metrics"].get(m)) for m, _ in TABLE_METRICS),
                 _cell(res["metrics"].get("delta-ndcg10"), signed=True) if name != doc["reference"] else "(reference)"]
        lines.append("| " + " | ".join(cells) + " |")
    interest_head = ["cat acc@1", "cat acc@3", "new-interest acc@1 migrating"]
    lines += ["", f"**Table 1b.** Next interest against `{INTEREST_REFERENCE}`: paired per-user difference "
              "(method − Markov) with its 95 % interval, overall and per platform. A win holds only when the "
              "interval excludes 0. *new-interest acc@1 migrating*: on users whose next category is not among "
              "their last k, is the most probable category outside those k the one they moved to.", "",
              "| method | ε | group | " + " | ".join(f"Δ {h}" for h in interest_head) + " |",
              "|" + "---|" * (3 + len(interest_head))]
    for name, entry in methods.items():
        if name == INTEREST_REFERENCE:
            continue
        eps, _ = _eps_cells(entry)
        for g, res in entry["groups"].items():
            if "->" in g or not any(f"delta-markov-{m}" in res["metrics"] for m in INTEREST_DELTAS):
                continue
            lines.append("| " + " | ".join([f"`{name}`", eps, g, *(
                _cell(res["metrics"].get(f"delta-markov-{m}"), signed=True) for m in INTEREST_DELTAS)]) + " |")
    lines += ["", "**Table 2.** The same per platform (methods evaluated on every platform).", "",
              "| method | ε | δ | platform | users | " + " | ".join(h for _, h in TABLE_METRICS) + " |",
              "|" + "---|" * (5 + len(TABLE_METRICS))]
    for name, entry in methods.items():
        eps, delta = _eps_cells(entry)
        for g, res in entry["groups"].items():
            if g == "overall" or "->" in g or entry["family"] == "lopo":
                continue
            lines.append("| " + " | ".join([f"`{name}`", eps, delta, g, str(res["users"]),
                                             *(_cell(res["metrics"].get(m)) for m, _ in TABLE_METRICS)]) + " |")
    cross_metrics = TABLE_METRICS[:4]
    lines += ["", "**Table 3.** Cross-platform: held-out users of platform B whose input is only their earlier "
              "events on platform A (`A->B`); next item ranked over B's catalogue, next interest among B's "
              "categories. Methods that train one model on both platforms' silos (local-only and "
              "leave-one-platform-out rows are elsewhere); Δ to the reference as in Table 1.", "",
              "| method | ε | δ | group | users | " + " | ".join(h for _, h in cross_metrics) + " | Δ NDCG@10 |",
              "|" + "---|" * (6 + len(cross_metrics))]
    for name, entry in methods.items():
        eps, delta = _eps_cells(entry)
        for g, res in entry["groups"].items():
            if "->" not in g:
                continue
            d = _cell(res["metrics"].get("delta-ndcg10"), signed=True) if name != doc["reference"] else "(reference)"
            lines.append("| " + " | ".join([f"`{name}`", eps, delta, g, str(res["users"]),
                                             *(_cell(res["metrics"].get(m)) for m, _ in cross_metrics), d]) + " |")
    lines += ["", "## Methods", "",
              "- baselines (`most-popular`, `category-markov`, `history-logit`, `item-cooccurrence`): fitted on the "
              "train split of every silo, centrally (not private). `history-logit` is the next-interest head's own "
              "conditional logit over the history features, fitted without noise to convergence: the ceiling of "
              "that head.",
              "- `federated-dp-eps*`: `fedshift simulate --epsilon ε` on every silo; the last round's checkpoint.",
              "- `federated-nonprivate`: `fedshift simulate --no-dp`, same config.",
              "- `local-only-eps*`: one `fedshift simulate` per silo on a dataset view holding only that silo, same ε "
              "and config; every held-out user is scored by the model of their own silo, platform rows pool the "
              "silos' users, 'overall' pools every platform.",
              "- `centralised-nonprivate`: all silos' training users pooled, no DP (`simulations/centralised.py`), "
              "the same number of gradient steps as all silos of a federated run together.",
              "- `lopo-A-to-B-eps*`: federated DP on A's silos only, evaluated on B's held-out users "
              "(zero-shot transfer through the text encoder).",
              "", "## Training runs", "", "| run | silos | DP | ε | seconds (estimate) |", "|---|---|---|---|---|"]
    for key, r in doc["runs"].items():
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:g}"
        reused = "reused: " if r.get("status") == "reused" else ""
        lines.append(f"| `{key}` | {', '.join(r['silos'])} | {'yes' if r['dp'] else 'no'} | {eps} | "
                     f"{reused}{r['seconds']:.0f} ({r['estimate-seconds']:.0f}) |")
    lines += ["", "Plots: `ndcg-vs-epsilon.png`, `migrating-accuracy-vs-epsilon.png`, `new-interest-vs-epsilon.png`, "
              "`metric-vs-round.png` "
              "(validation users, from each federated run's `metrics.json`).", ""]
    return "\n".join(lines)


def write_outputs(doc: Mapping[str, Any], out: Path) -> list[str]:
    """Write results.json/.csv/.md and the plots (each atomically); returns the plots' names."""
    write_bytes_atomic(out / "results.json", json.dumps(doc, indent=2, default=str).encode())
    write_bytes_atomic(out / "results.csv", csv_bytes(csv_header(), results_rows(doc), compress=False))
    write_bytes_atomic(out / "results.md", results_markdown(doc).encode())
    pngs = plots(doc)
    for name, data in pngs.items():
        write_bytes_atomic(out / name, data)
    return list(pngs)


def plots(doc: Mapping[str, Any]) -> dict[str, bytes]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        return buf.getvalue()

    out: dict[str, bytes] = {}
    methods = doc["methods"]
    for fname, metric, label in (("ndcg-vs-epsilon.png", "ndcg10", "NDCG@10"),
                                 ("migrating-accuracy-vs-epsilon.png", "category-acc1-migrating",
                                  "next-category accuracy@1, migrating users"),
                                 ("new-interest-vs-epsilon.png", "new-interest-acc1-migrating",
                                  "new-interest accuracy@1, migrating users")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        dp = sorted(((e["epsilon"], e["groups"]["overall"]["metrics"].get(metric)) for e in methods.values()
                     if e["family"] == "federated-dp" and "overall" in e["groups"]), key=lambda t: t[0])
        dp = [(x, m) for x, m in dp if m and m.get("value") is not None]
        if dp:
            xs = [x for x, _ in dp]
            ys = [m["value"] for _, m in dp]
            err = [[max(m["value"] - (m["ci95"][0] if m["ci95"][0] is not None else m["value"]), 0) for _, m in dp],
                   [max((m["ci95"][1] if m["ci95"][1] is not None else m["value"]) - m["value"], 0) for _, m in dp]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="federated DP", color="C0")
        color = 1
        for name, e in methods.items():
            if "overall" not in e["groups"] or e["family"] == "federated-dp":
                continue
            m = e["groups"]["overall"]["metrics"].get(metric)
            if not m or m.get("value") is None:
                continue
            color += 1
            if e["family"] == "local-only":
                lo, hi = m["ci95"]
                ax.errorbar([e["epsilon"] * 1.08], [m["value"]], color=f"C{color % 10}",  # beside the federated point
                            yerr=[[m["value"] - (lo if lo is not None else m["value"])],
                                  [(hi if hi is not None else m["value"]) - m["value"]]],
                            marker="s", capsize=3, linestyle="none", label=name)
            else:
                ax.axhline(m["value"], linestyle="--" if e["family"] != "baseline" else ":", linewidth=1,
                           label=f"{name} (ε=∞)" if e["family"] != "baseline" else name,
                           color=f"C{color % 10}")
        ax.set_xscale("log")
        ax.set_xlabel("ε per silo (δ = %g)" % next((e["delta"] for e in methods.values() if e["delta"]), 1e-5))
        ax.set_ylabel(f"{label} (overall, {doc['split']})")
        ax.set_title(f"{label} vs ε\n(95 % bootstrap intervals)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        out[fname] = png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, label) in zip(axes, (("ndcg10", "NDCG@10"), ("category-accuracy", "next-category accuracy"))):
        for key, curves in doc["curves"].items():
            pts = curves.get(metric) or []
            if pts:
                ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("server round (0 = untrained)")
        ax.set_ylabel(f"{label} (validation, all silos of the run)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{label} vs round")
    axes[0].legend(fontsize=7, loc="best")
    out["metric-vs-round.png"] = png(fig)
    return out


def preset_with(preset: ExperimentPreset, **changes: Any) -> ExperimentPreset:
    """A copy of ``preset`` with some fields changed (CLI flags)."""
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})
