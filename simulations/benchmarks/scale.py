"""Benchmark: how a simulated federation's round time and memory grow with the number of
silos, the users per silo and the catalogue size.

Every point is a real ``fedshift simulate`` run (:func:`fedshift.simulation.run_simulation`:
``flwr run`` with Flower's Ray simulation backend, DP-SGD in every silo) on a dataset from
:mod:`simulations.datasets.generator`: 4 platforms × (silos / 4) regions, so the catalogue
stays the same while silos are added. Round time comes from the run's Flower log
(:mod:`simulations.benchmarks.round_log`); peak memory from sampling the whole process tree
(:mod:`simulations.benchmarks.process_memory`: this process, the SuperLink, ServerApp,
simulation process, Ray's GCS, raylet and actors).

The encoder is a tiny random BERT (2 layers, hidden 32, the bundled vocabulary) unless
``model="minilm"`` (the bundled all-MiniLM-L6-v2): the figures are the federation's cost
(Flower, Ray, the ServerApp, per-silo setup and DP bookkeeping) with a cheap model. Each row
names its model. The Ray backend runs ``client-resources-num-cpus`` = 1 (one actor per CPU)
unless told otherwise; each row names its backend settings and actor count.

    python -m simulations.benchmarks.scale --silos 4 16 64 100 --out /tmp/scale
    python -m simulations.benchmarks.scale --growth --out /tmp/growth
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from simulations.benchmarks.process_memory import TreeMemory
from simulations.benchmarks.round_log import round_times
from simulations.benchmarks.start_retry import run_with_start_retries

PLATFORMS = 4
BACKEND = {"client-resources-num-cpus": 1}  # one Ray actor per CPU (Flower's default: 2 CPUs per actor)
MODELS = ("tiny", "minilm")


@dataclass(frozen=True)
class Point:
    """One measured federation: its data, model, rounds and Flower backend settings."""

    silos: int
    users_per_silo: int = 40
    items_per_category: int = 20
    categories: int = 8
    rounds: int = 1
    local_steps: int = 2
    batch_size: int = 16
    model: str = "tiny"
    backend: dict = field(default_factory=lambda: dict(BACKEND))

    @property
    def platforms(self) -> int:
        return math.gcd(self.silos, PLATFORMS)

    @property
    def regions(self) -> int:
        return self.silos // self.platforms

    @property
    def items(self) -> int:
        return self.platforms * self.categories * self.items_per_category

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def actors(backend: dict, cpus: int) -> int:
    """Ray actors Flower's pool starts: the CPUs Ray has over the CPUs per actor (Flower's default 2)."""
    per_actor = backend.get("client-resources-num-cpus", 2)
    return max(1, backend.get("init-args-num-cpus", cpus) // per_actor)


def model_folder(model: str, root: Path) -> tuple[str, str]:
    """(``base-model`` value, description) for ``model``; the tiny BERT is written under ``root``."""
    if model == "minilm":
        return "", "all-MiniLM-L6-v2 (bundled, 6 layers, hidden 384)"
    if model != "tiny":
        raise ValueError(f"model {model!r}: use one of {', '.join(MODELS)}")
    from shared_model.encoder import write_tiny_bert

    folder = root / "tiny-bert"
    if not (folder / "config.json").is_file():
        write_tiny_bert(folder, seed=0)
    return str(folder), "tiny random BERT (2 layers, hidden 32, bundled vocabulary)"


_MEASURED: dict[str, dict] = {}  # point key -> row, so a point measured twice in one process runs once


def measure(point: Point, out_dir: Path, *, timeout: float = 3600) -> dict:
    """Run one simulation of ``point`` under ``out_dir``; return its row."""
    if point.key() in _MEASURED:
        return dict(_MEASURED[point.key()])
    from shared_model.config import RunConfig
    from simulations.datasets.generator import generate

    out_dir = Path(out_dir)
    name = f"s{point.silos}-u{point.users_per_silo}-i{point.items}-{point.model}-r{point.rounds}"
    data = out_dir / "data" / name
    if not (data / "dataset.json").is_file():
        generate(data, users=point.users_per_silo * point.regions, platforms=point.platforms, regions=point.regions,
                 categories_per_platform=point.categories, items_per_category=point.items_per_category, seed=7)
    base_model, model_desc = model_folder(point.model, out_dir)
    cfg = RunConfig().replace(**{
        "dataset": str(data.resolve()), "base-model": base_model, "num-server-rounds": point.rounds,
        "local-steps": point.local_steps, "batch-size": point.batch_size, "min-nodes": point.silos,
        "max-eval-users": 64,
    })
    run_dir = out_dir / "runs" / name
    progress = io.StringIO()
    cpus = os.cpu_count() or 1
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with TreeMemory() as mem:
        result, attempt = run_with_start_retries(
            cfg, run_dir, attempts=3, timeout=timeout, stream=progress, silo_seed=0, federation=point.backend,
            on_retry=lambda n: print(f"scale: {name}: Flower's SuperLink or Ray's node missed its fixed start-up "
                                     f"time (machine load {os.getloadavg()[0]:.1f}); attempt {n}",
                                     file=sys.stderr, flush=True))
    wall = time.perf_counter() - started
    times = round_times(result.log)
    per_round = [r["round_s"] for r in times["rounds"]]
    row = {
        "silos": point.silos,
        "round_s": round(sum(per_round) / len(per_round), 1) if per_round else None,
        **mem.peak.as_row(),
        "ok": result.ok, "status": result.status, "attempts": attempt,
        "rounds": point.rounds, "round_s_each": per_round,
        "train_s_each": [r["train_s"] for r in times["rounds"]],
        "round0_s": times["round0_s"], "wall_s": round(wall, 1),
        "users_per_silo": point.users_per_silo, "items": point.items,
        "platforms": point.platforms, "regions": point.regions,
        "local_steps": point.local_steps, "batch_size": point.batch_size, "dp": True,
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after: shared machine
        "model": model_desc, "num_cpus": cpus, "actors": actors(point.backend, cpus),
        "backend": {"name": "ray", **point.backend},
        "rss_by_process_gib": {k: round(v / 2 ** 30, 3) for k, v in sorted(
            mem.peak.names_at_peak.items(), key=lambda kv: -kv[1])},
        "run_dir": str(run_dir),
    }
    _MEASURED[point.key()] = row
    (out_dir / "rows").mkdir(parents=True, exist_ok=True)  # each point as it is measured
    (out_dir / "rows" / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    return dict(row)


def scale_rows(silos: list[int], *, quick: bool, out_dir: Path, model: str = "tiny",
               backend: dict | None = None, rounds: int = 1) -> list[dict]:
    """One row per silo count: ``silos``, ``round_s`` (mean wall seconds of a server round: train
    + aggregate + evaluate, after round 0 has started the actors), ``peak_rss_gib`` (the whole
    process tree), and extras. ``quick`` and full differ in the silo counts the caller passes
    (the bench: 4, 16 vs 4, 16, 64, 100); each point runs ``rounds`` rounds."""
    del quick  # same per-point settings: the silo counts make a run quick
    rows = []
    for n in silos:
        point = Point(silos=n, rounds=rounds, model=model, backend=dict(backend or BACKEND))
        row = measure(point, Path(out_dir))
        print(f"scale: {n:4d} silos  round {row['round_s']} s  peak RSS {row['peak_rss_gib']:.2f} GiB "
              f"(PSS {row['peak_pss_gib']:.2f})  {row['actors']} actors  ok={row['ok']}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def loglog_fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares of log y = log a + b log x (``b``: the growth exponent, time ∝ x^b) and of
    y = c + s x (``s``: seconds per unit of x). Needs two or more distinct positive x."""
    if len(xs) != len(ys) or len(set(xs)) < 2 or min(xs) <= 0 or min(ys) <= 0:
        raise ValueError(f"need ≥ 2 distinct positive x with positive y, got x={xs} y={ys}")
    n = len(xs)

    def line(u: list[float], v: list[float]) -> tuple[float, float]:
        mu, mv = sum(u) / n, sum(v) / n
        slope = sum((a - mu) * (b - mv) for a, b in zip(u, v)) / sum((a - mu) ** 2 for a in u)
        return mv - slope * mu, slope

    log_a, b = line([math.log(x) for x in xs], [math.log(y) for y in ys])
    c, s = line(list(xs), list(ys))
    return {"exponent": round(b, 3), "coefficient": round(math.exp(log_a), 4),
            "per_unit_s": round(s, 6), "intercept_s": round(c, 3), "points": [[x, y] for x, y in zip(xs, ys)]}


def cost_growth(*, quick: bool, out_dir: Path, silos: int = 4, model: str = "tiny") -> dict:
    """Round time against users per silo and against catalogue size (``silos`` silos, 1 round
    each), fitted by :func:`loglog_fit`; quick: two points each, else three."""
    users = [40, 160] if quick else [40, 160, 640]
    per_category = [20, 80] if quick else [20, 80, 320]
    base = Point(silos=silos, rounds=1, model=model)
    result: dict = {"silos": silos, "model": model}
    for axis, points, x_of in (
        ("users_per_silo", [replace(base, users_per_silo=u) for u in users], lambda p: p.users_per_silo),
        ("items", [replace(base, items_per_category=k) for k in per_category], lambda p: p.items),
    ):
        rows = [measure(p, Path(out_dir)) for p in points]
        xs = [float(x_of(p)) for p in points]
        ys = [float(r["round_s"] or 0) for r in rows]
        try:
            fit = loglog_fit(xs, ys)
        except ValueError as exc:
            fit = {"error": str(exc), "points": [[x, y] for x, y in zip(xs, ys)]}
        fit["train_s"] = [r["train_s_each"][0] if r["train_s_each"] else None for r in rows]
        fit["peak_rss_gib"] = [r["peak_rss_gib"] for r in rows]
        result[axis] = fit
        print(f"growth in {axis}: points {fit['points']}; round time ∝ {axis}^{fit.get('exponent')} "
              f"(linear: {fit.get('per_unit_s')} s per unit)", file=sys.stderr, flush=True)
    return result


def plot_rows(rows: list[dict], path: Path, goal_gib: float = 8.0) -> Path:
    """Round time and peak memory (RSS and PSS of the whole tree) against the number of silos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r.get("round_s")), key=lambda r: r["silos"])
    silos = [r["silos"] for r in rows]
    fig, left = plt.subplots(figsize=(6.4, 4.0))
    left.plot(silos, [r["round_s"] for r in rows], "o-", color="tab:blue", label="round time (s)")
    if all(r.get("round0_s") for r in rows):
        left.plot(silos, [r["round0_s"] for r in rows], "o:", color="tab:cyan",
                  label="round 0 (s): evaluation, cold actors")
    left.set_ylim(bottom=0)
    left.set_xlabel("simulated silos")
    left.set_ylabel("seconds per round", color="tab:blue")
    right = left.twinx()
    right.plot(silos, [r["peak_rss_gib"] for r in rows], "s-", color="tab:red", label="peak RSS, process tree")
    right.plot(silos, [r["peak_pss_gib"] for r in rows], "s--", color="tab:orange", label="peak PSS, process tree")
    right.axhline(goal_gib, color="grey", linestyle=":", label=f"goal {goal_gib:g} GiB")
    right.set_ylabel("GiB", color="tab:red")
    right.set_ylim(0, max(goal_gib * 1.1, max(r["peak_rss_gib"] for r in rows) * 1.1))
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [str(h.get_label()) for h in handles], loc="upper left", fontsize=8)
    first = rows[0]
    left.set_title(f"{first['actors']} Ray actors on {first['num_cpus']} CPUs, {first['users_per_silo']} users/silo, "
                   f"{first['items']} items, tiny BERT, DP", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.benchmarks.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--silos", type=int, nargs="*", default=[], help="silo counts to measure (multiples of 4 keep the catalogue)")
    p.add_argument("--growth", action="store_true", help="also fit round time against users per silo and catalogue size")
    p.add_argument("--quick", action="store_true", help="1 round per point, two growth points per axis")
    p.add_argument("--model", choices=MODELS, default="tiny")
    p.add_argument("--rounds", type=int, default=1, help="server rounds per scale point (default 1)")
    p.add_argument("--client-cpus", type=int, default=BACKEND["client-resources-num-cpus"],
                   help="Flower's client-resources-num-cpus: CPUs per Ray actor (default 1)")
    p.add_argument("--out", type=Path, help="folder for datasets, runs and scale.json (required to measure)")
    p.add_argument("--plot", type=Path, help="PNG of round time and peak memory against silos (with --silos)")
    p.add_argument("--plot-from", type=Path, metavar="JSON", help="only plot (--plot) the scale rows of this scale.json")
    a = p.parse_args(argv)
    if not a.plot_from and not a.out:
        p.error("--out is required to measure")
    if a.plot_from:
        plot_rows(json.loads(a.plot_from.read_text())["scale"], a.plot or a.plot_from.with_suffix(".png"))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"machine": {"cpus": os.cpu_count(), "memory_gib": round(_total_memory() / 2 ** 30, 1)}}
    if a.silos:
        doc["scale"] = scale_rows(a.silos, quick=a.quick, out_dir=a.out, model=a.model,
                                  backend={"client-resources-num-cpus": a.client_cpus}, rounds=a.rounds)
    if a.plot and doc.get("scale"):
        plot_rows(doc["scale"], a.plot)
    if a.growth:
        doc["growth"] = cost_growth(quick=a.quick, out_dir=a.out, model=a.model)
    name = "scale.json" if not a.growth or a.silos else "growth.json"
    (a.out / name).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


if __name__ == "__main__":
    sys.exit(main())
