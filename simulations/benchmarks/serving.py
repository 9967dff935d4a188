"""Benchmark: ``fedshift recommend`` latency over a platform's whole catalogue, and its cold start.

A checkpoint is written from a model built by the run config (round 0: LoRA and heads at
their seeded start; the compute per call is the same as a trained checkpoint's), with the
bundled catalogue. Then:

* **cold start**: one ``fedshift recommend --json`` process (imports, model load,
  catalogue, the item index cached beside the checkpoint): its wall time and its own
  ``timing_ms``. The first in-process load before it builds that cached index.
* **warm**: ``calls`` calls of :meth:`shared_model.recommender.Recommender.recommend` in
  this process on one torch thread, over the platform with the most items, with the last
  ``history`` titles of a test user of that platform; p50 / p99 / max of the wall time,
  and of the CPU time of the calling thread (the one torch thread), which other processes
  on a shared machine do not inflate.
* **where the time goes**: the same calls split into resolving titles, encoding the
  history (:meth:`Scorer.encode_history`) and scoring (:meth:`Scorer.score`: the encoder
  forward and the dot products with every item); with ``profile`` the top functions of
  cProfile over the warm calls.
* **short history**: p50 / p99 with only the last 3 of those titles (fewer tokens).
* **long title**: one call whose history is a single 100 KB title (the case of issue #16).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shared_model.adapters import save_checkpoint
from shared_model.config import RunConfig
from shared_model.dataset import load_catalogue, load_silo
from shared_model.item_index import catalogue_hash
from shared_model.model import build_model
from shared_model.recommender import Recommender, percentile_ms
from shared_model.scorer import Scorer

LONG_TITLE = " ".join(["archival acrylic paint brush set with ergonomic handles"] * 2000)[: 100 * 1024]


def write_checkpoint(folder: Path, cfg: RunConfig) -> Path:
    """A round-0 checkpoint of ``cfg`` on its dataset's catalogue."""
    catalogue = load_catalogue(cfg.dataset_dir(), cfg.base_model or None, cfg.max_item_tokens)
    categories = catalogue.interest_vocab()
    meta = {"round": 0, "categories": categories, "catalogue-sha256": catalogue_hash(catalogue),
            "interests": catalogue.interest_choice, "config": cfg.to_run_config()}
    return save_checkpoint(build_model(cfg, len(categories)), folder, meta)


def sample_history(cfg: RunConfig, scorer: Scorer, platform: str, length: int) -> list[str]:
    """The last ``length`` event titles of the first test user with that many events on ``platform``."""
    best: list[str] = []
    dirs = sorted((cfg.dataset_dir() / "silos").iterdir(), key=lambda d: (not d.name.startswith(platform), d.name))
    for silo_dir in dirs:
        silo = load_silo(silo_dir, scorer.catalogue)
        if silo.platform != platform:
            continue
        for user in silo.users("test"):
            events = silo.histories.get(user, ())
            titles = [scorer.catalogue.items[e.item_id].title for e in events][-length:]
            if len(titles) == length:
                return titles
            best = max(best, titles, key=len)
    return best


def _split_ms(rec: Recommender, platform: str, titles: list[str], calls: int) -> dict[str, float]:
    """Median ms of resolve, encode_history and score over ``calls`` calls."""
    parts: dict[str, list[float]] = {"resolve": [], "encode_history": [], "score": []}
    for _ in range(calls):
        t0 = time.perf_counter()
        events, cat, _ = rec.resolve(titles, platform)
        t1 = time.perf_counter()
        encoded = rec.scorer.encode_history(events, platform, cat)
        t2 = time.perf_counter()
        rec.scorer.score([encoded], platform)
        t3 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[name].append(dt)
    return {name: round(percentile_ms(v, 50), 3) for name, v in parts.items()}


def _inputs(encoded: object) -> int:
    """What the model reads of one history: its events (sequence model) or its tokens (text tower)."""
    return len(encoded.rows) if hasattr(encoded, "rows") else int(len(encoded[0]))  # type: ignore[index, arg-type]


def cold_start(checkpoint: Path, platform: str, titles: list[str]) -> dict[str, object]:
    """One ``fedshift recommend`` process: wall seconds and its own timing."""
    cmd = [sys.executable, "-m", "fedshift.cli", "recommend", "--checkpoint", str(checkpoint), "--platform", platform,
           "--history", "; ".join(t.replace(";", ",") for t in titles), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    out = json.loads(proc.stdout)
    return {"ok": True, "process_s": round(wall, 2), "timing_ms": out["timing_ms"],
            "index_source": out["index"]["source"]}


def serving(work_dir: Path, calls: int, history: int = 10, profile: bool = True, goal_ms: float = 10.0,
            dataset: str = "", base_model: str = "", log=lambda msg: None) -> dict[str, object]:
    cfg = RunConfig.from_run_config({"dataset": dataset, "base-model": base_model})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log("serving: writing a round-0 checkpoint and caching its item index")
        ckpt = write_checkpoint(work_dir / "serving-checkpoint", cfg)
        t0 = time.perf_counter()
        scorer = Scorer.from_checkpoint(ckpt)
        first_load = time.perf_counter() - t0
        platform = max(scorer.catalogue.platforms, key=lambda p: len(scorer.index.platform_rows(p)))
        titles = sample_history(cfg, scorer, platform, history)
        rec = Recommender(scorer)
        for _ in range(min(20, calls)):
            rec.recommend(platform, titles)
        log(f"serving: {calls} warm calls on {platform} ({len(scorer.index.platform_rows(platform))} items), 1 thread")
        samples, cpu = [], []
        for _ in range(calls):
            t, c = time.perf_counter(), time.thread_time()
            rec.recommend(platform, titles)
            samples.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        split = _split_ms(rec, platform, titles, max(20, calls // 5))
        short = []
        for _ in range(max(20, calls // 5)):
            t = time.perf_counter()
            rec.recommend(platform, titles[-3:])
            short.append(time.perf_counter() - t)
        events, cat, _ = rec.resolve(titles, platform)
        out: dict[str, object] = {
            "platform": platform, "items": len(scorer.index.platform_rows(platform)),
            "catalogue_items": len(scorer.index.item_ids), "history_titles": len(titles), "calls": calls,
            "history_inputs": _inputs(scorer.encode_history(events, platform, cat)),
            "threads": 1, "p50_ms": round(percentile_ms(samples, 50), 3),
            "p99_ms": round(percentile_ms(samples, 99), 3), "max_ms": round(float(np.max(samples)) * 1000, 3),
            "cpu_p50_ms": round(percentile_ms(cpu, 50), 3), "cpu_p99_ms": round(percentile_ms(cpu, 99), 3),
            "split_median_ms": split, "three_titles_p50_ms": round(percentile_ms(short, 50), 3),
            "three_titles_p99_ms": round(percentile_ms(short, 99), 3), "first_load_s": round(first_load, 2),
            "first_load_timing_s": {
                k: round(v, 3) for k, v in scorer.timings.items()}, "goal_ms": goal_ms,
        }
        out["met"] = out["p99_ms"] <= goal_ms
        if profile and not out["met"]:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(max(20, calls // 5)):
                rec.recommend(platform, titles)
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
            out["profile"] = text.getvalue().split("\n", 6)[-1][:4000]
        log("serving: one 100 KB title")
        t = time.perf_counter()
        rec.recommend(platform, [LONG_TITLE])
        out["long_title_100kb_s"] = round(time.perf_counter() - t, 3)
        log("serving: cold start (a fresh `fedshift recommend` process)")
        out["cold_start"] = cold_start(ckpt, platform, titles)
        return out
    finally:
        torch.set_num_threads(threads)
