"""Benchmark: items per second embedding the catalogue, and the cache-hit path.

* **embedding**: :func:`shared_model.item_index.encode_texts` (what builds the frozen item
  tower's index) over the first ``items`` catalogue texts, timed after one warm-up batch,
  at torch's thread count of the process; items per wall second and per CPU second (all
  threads; the figure other work on a shared machine inflates less).
* **cache hit**: :func:`shared_model.item_index.build_item_index` on the whole catalogue
  when its cached index exists (the hashes of model and catalogue that make the key, the
  load, the integrity checks), timed on its second call (the first builds the index when
  it is not cached yet).
"""

from __future__ import annotations

import time

import torch

from shared_model.config import RunConfig
from shared_model.dataset import load_catalogue
from shared_model.item_index import build_item_index, cache_dir, encode_texts
from shared_model.schema import DEFAULT_EVENT_TYPE
from shared_model.serialize import event_text


def catalogue_throughput(items: int, dataset: str = "", base_model: str = "", log=lambda msg: None) -> dict[str, object]:
    cfg = RunConfig.from_run_config({"dataset": dataset, "base-model": base_model})
    catalogue = load_catalogue(cfg.dataset_dir(), cfg.base_model or None, cfg.max_item_tokens)
    ids = list(catalogue.items)
    texts = [event_text(catalogue.items[i], DEFAULT_EVENT_TYPE) for i in ids]
    n = min(items, len(texts))
    log(f"catalogue: embedding {n} of {len(texts)} items, {torch.get_num_threads()} threads")
    encode_texts(texts[:64], cfg.base_model or None, cfg.max_item_tokens)  # warm-up (loads the encoder)
    t0, cpu0 = time.perf_counter(), time.process_time()
    encode_texts(texts[:n], cfg.base_model or None, cfg.max_item_tokens)
    embed_s, embed_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    out: dict[str, object] = {
        "catalogue_items": len(texts), "embedded_items": n, "threads": torch.get_num_threads(),
        "max_item_tokens": cfg.max_item_tokens, "embed_s": round(embed_s, 3),
        "embed_items_per_s": round(n / embed_s, 1), "embed_cpu_s": round(embed_cpu_s, 3),
        "embed_items_per_cpu_s": round(n / embed_cpu_s, 1),
        "full_catalogue_embed_s_extrapolated": round(len(texts) * embed_s / n, 1),
    }
    log(f"catalogue: cache-hit path ({cache_dir()})")
    first = time.perf_counter()
    build_item_index(catalogue, cfg.base_model or None, cfg.max_item_tokens)
    first_s = time.perf_counter() - first
    t0 = time.perf_counter()
    build_item_index(catalogue, cfg.base_model or None, cfg.max_item_tokens)
    hit_s = time.perf_counter() - t0
    out.update({"first_index_s": round(first_s, 3), "cache_hit_s": round(hit_s, 3),
                "cache_hit_items_per_s": round(len(texts) / hit_s, 1)})
    return out
