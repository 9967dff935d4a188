"""``fedshift bench``: DP overhead, traffic, serving, catalogue throughput and scale, measured
on this machine, with the machine recorded (docs/performance.md reads these figures).

Each section is one function in :mod:`simulations.benchmarks` (``dp_overhead``,
``traffic``, ``serving``, ``catalogue``); the scale section calls
``simulations.benchmarks.scale`` (``scale_rows`` and ``cost_growth``) when that module is
present, and says it is not available otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

SECTIONS = ("traffic", "catalogue", "serving", "dp", "scale")
GOALS = {"dp_step_ratio": 1.15, "payload_ratio": 0.002, "recommend_p99_ms": 10.0, "peak_rss_gib_100_silos": 8.0}

DESCRIPTION = """\
Measure what a researcher or a silo operator needs to size a run, on whatever device this
machine has, and print the figures against their goals.

sections (all by default; pick some with --only):
  traffic    bytes a silo sends and receives per round (the real arrays, serialised as
             Flower sends them) against the base encoder's fp32 bytes -> payload_ratio
             (goal <= 0.2 %); both lora modes, and the same arrays cast to fp16
  catalogue  items per second embedding the catalogue with the frozen encoder, and the
             cached index's load (the cache-hit path)
  serving    `recommend` over the largest platform's whole catalogue on one thread:
             warm p50/p99 over 1000 calls (200 with --quick) -> recommend_p99_ms, wall
             time (goal <= 10 ms), and the calling thread's CPU time beside it; the
             split into resolve / encode history / score, a profile when the goal is
             missed, one 100 KB title, and the cold start of a fresh process
  dp         seconds per training step of the silo's own round (fl_client.dp_train) with
             DP-SGD and without, at the same expected batch, for each Opacus
             grad-sample-mode (hooks, functorch, ew, ghost; a mode that cannot run says
             why), each in its own process (one torch thread; --dp-threads) for its
             peak memory -> dp_step_ratio = the best mode's CPU seconds per example
             over plain training's (goal <= 1.15; the wall-time ratios beside it); a
             cProfile of the best mode (and of plain training, without --quick) when
             the goal is missed
  scale      federations of 4, 16, 64, 100 silos (4 and 16 with --quick) on generated
             data: round time and peak RSS of the process tree, and how the round time
             grows with users and items (simulations.benchmarks.scale)

The data is the bundled dataset and encoder unless --dataset / --base-model say otherwise.
Progress goes to stderr; the figures to stdout (a summary, or JSON with --json) and, with
--out DIR, to DIR/bench.json (written atomically). The JSON holds the machine (device,
CPU count, torch threads, versions), every section's figures, and at top level
dp_step_ratio, payload_ratio, recommend_p99_ms and scale (rows with silos, round_s,
peak_rss_gib), each null when its section did not run.
"""

EPILOG = """\
examples:
  fedshift bench --quick --json --out runs/bench
  fedshift bench --only traffic serving
  fedshift bench --only dp --json > dp.json
exit status: 0 every section that ran measured (goals met or not; see "met");
1 a section failed (its error is in the JSON under "errors"); 2 bad arguments.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure DP overhead, traffic, serving latency, throughput and scale",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer steps, calls, items and silos (about 10 minutes on 2 CPU cores)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--out", metavar="DIR", help="also write DIR/bench.json (and the scale section's runs)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                   help=f"run only these sections ({', '.join(SECTIONS)})")
    p.add_argument("--dataset", metavar="DIR", default="", help="dataset folder (default: the bundled one)")
    p.add_argument("--base-model", metavar="DIR", default="", help="BERT folder (default: the bundled encoder)")
    p.add_argument("--dp-threads", type=int, default=1, metavar="N",
                   help="torch threads of the dp section's processes (default: 1, whose CPU time other work on "
                        "the machine does not inflate; 0: torch's default)")
    p.set_defaults(func=run)


def machine() -> dict[str, Any]:
    """Device, CPUs, threads and library versions of this process."""
    import flwr
    import opacus
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": cuda, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
        "opacus": opacus.__version__, "transformers": transformers.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/meminfo") as fh:
            info["memory_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _scale(quick: bool, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    try:
        scale = importlib.import_module("simulations.benchmarks.scale")
    except ModuleNotFoundError as e:
        if e.name != "simulations.benchmarks.scale":
            raise
        return {"available": False, "reason": "simulations.benchmarks.scale is not in this checkout"}
    silos = [4, 16] if quick else [4, 16, 64, 100]
    log(f"scale: federations of {', '.join(map(str, silos))} silos")
    rows = scale.scale_rows(silos, quick=quick, out_dir=out_dir / "scale")
    log("scale: cost growth with users and items")
    return {"available": True, "rows": rows, "cost_growth": scale.cost_growth(quick=quick, out_dir=out_dir / "growth")}


def run_sections(sections: list[str], quick: bool, work: Path, scale_dir: Path, dataset: str, base_model: str,
                 log: Callable[[str], None], dp_threads: int = 1) -> tuple[dict[str, Any], dict[str, str]]:
    """Each section's figures, and the one-line error of each section that failed (``work``: a
    scratch folder; ``scale_dir``: where the scale section keeps its runs)."""
    from simulations.benchmarks import catalogue, dp_overhead, serving, traffic

    calls: dict[str, Callable[[], dict[str, Any]]] = {
        "traffic": lambda: traffic.traffic(dataset, base_model, GOALS["payload_ratio"], log=log),
        "catalogue": lambda: catalogue.catalogue_throughput(256 if quick else 2048, dataset, base_model, log=log),
        "serving": lambda: serving.serving(work, 200 if quick else 1000, goal_ms=GOALS["recommend_p99_ms"],
                                           dataset=dataset, base_model=base_model, log=log),
        "dp": lambda: dp_overhead.dp_overhead(3 if quick else 8, goal=GOALS["dp_step_ratio"], dataset=dataset,
                                              base_model=base_model, quick=quick, threads=dp_threads, log=log),
        "scale": lambda: _scale(quick, scale_dir, log),
    }
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in sections:
        t0 = time.perf_counter()
        try:
            results[name] = calls[name]()
        except Exception as e:  # one section's failure is reported; the others still run
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"{name}: FAILED: {errors[name]}")
            continue
        results[name]["section_s"] = round(time.perf_counter() - t0, 1)
        if name == "scale" and not results[name].get("available"):
            log(f"scale: not available ({results[name]['reason']})")
    return results, errors


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The top-level figures the goals are read from (null when their section did not run)."""
    s = report["sections"]
    scale = s.get("scale", {})
    rows = scale.get("rows") if scale.get("available") else None
    goals: dict[str, Any] = {}
    for key, value in (("dp_step_ratio", s.get("dp", {}).get("dp_step_ratio")),
                       ("payload_ratio", s.get("traffic", {}).get("payload_ratio")),
                       ("recommend_p99_ms", s.get("serving", {}).get("p99_ms"))):
        report[key] = value
        goals[key] = {"goal": GOALS[key], "value": value, "met": None if value is None else value <= GOALS[key]}
    report["recommend_cpu_p99_ms"] = s.get("serving", {}).get("cpu_p99_ms")
    report["scale"] = rows
    biggest = max(rows, key=lambda r: r["silos"]) if rows else None
    if biggest is not None and biggest["silos"] >= 100:
        goals["peak_rss_gib_100_silos"] = {"goal": GOALS["peak_rss_gib_100_silos"], "value": biggest["peak_rss_gib"],
                                           "met": biggest["peak_rss_gib"] <= GOALS["peak_rss_gib_100_silos"]}
    report["goals"] = goals
    return report


def _print_summary(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"fedshift bench{' --quick' if report['quick'] else ''}: {m['device']}, {m['cpus_usable']} CPU(s), "
          f"{m['torch_threads']} torch threads, torch {m['torch']}, flwr {m['flwr']}, opacus {m['opacus']}; "
          f"{report['seconds']:.0f} s")
    for key, g in report["goals"].items():
        state = "not run" if g["met"] is None else ("met" if g["met"] else "MISSED")
        print(f"  {key:<24} {g['value'] if g['value'] is not None else '-':>12}  goal <= {g['goal']:<8} {state}")
    for row in report["scale"] or []:
        print(f"  scale {row['silos']:>4} silos: {row['round_s']:.1f} s/round, peak RSS {row['peak_rss_gib']:.2f} GiB")
    for name, err in report["errors"].items():
        print(f"  {name}: FAILED: {err}")


def run(args: argparse.Namespace) -> int:
    from shared_model.io_utils import write_bytes_atomic

    sections = [s for s in SECTIONS if s in (args.only or SECTIONS)]
    dataset = str(Path(args.dataset).expanduser().resolve()) if args.dataset else ""
    base_model = str(Path(args.base_model).expanduser().resolve()) if args.base_model else ""
    for flag, value in (("--dataset", dataset), ("--base-model", base_model)):
        if value and not Path(value).is_dir():
            print(f"fedshift bench: {flag} {value}: folder not found", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    out = Path(args.out).expanduser() if args.out else None
    started = time.perf_counter()
    report: dict[str, Any] = {"fedshift_bench": 1, "quick": bool(args.quick), "sections_run": sections,
                              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="fedshift-bench-") as tmp:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        report["sections"], report["errors"] = run_sections(sections, args.quick, Path(tmp), out or Path(tmp),
                                                            dataset, base_model, log, args.dp_threads)
    report["seconds"] = round(time.perf_counter() - started, 1)
    summary(report)
    text = json.dumps(report, indent=2, default=str)
    if out is not None:
        write_bytes_atomic(out / "bench.json", (text + "\n").encode())
        log(f"wrote {out / 'bench.json'}")
    if args.json:
        print(text)
    else:
        _print_summary(report)
    return 1 if report["errors"] else 0
