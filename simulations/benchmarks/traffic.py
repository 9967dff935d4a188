"""Benchmark: bytes a silo sends and receives per round, against the full encoder's fp32 bytes.

What crosses the wire each round is the trainable state (:func:`shared_model.adapters.to_arrays`):
the server sends the global one and each silo replies with its own, same names and shapes.
Both are measured by serialising the real arrays of a model built from the run config
(``lora-mode``: ``ffa`` sends LoRA B and the heads, ``fedavg`` also A):

* ``payload_bytes``: Flower's serialised array bytes, the figure ``metrics.json`` records
  per reply (:func:`fl_server.strategy.payload_bytes`);
* ``proto_bytes``: the ArrayRecord as Flower's protobuf message (``array_record_to_proto``),
  i.e. with names, shapes and dtypes, before gRPC framing and TLS.

The small records beside the arrays (metrics, status, one ledger line; the train config)
are not counted. ``fp16_payload_bytes`` serialises the same arrays cast to fp16: the
transport saving an fp16 option would give (there is no such option today).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord
from flwr.common.serde import array_record_to_proto

from fl_server.strategy import payload_bytes
from shared_model.adapters import to_arrays
from shared_model.config import RunConfig
from shared_model.dataset import load_catalogue
from shared_model.model import build_model


def _fp16(arrays: ArrayRecord) -> ArrayRecord:
    return ArrayRecord({k: Array(arrays[k].numpy().astype("float16")) for k in arrays.keys()})


def measure(cfg: RunConfig, num_categories: int) -> dict[str, object]:
    """Bytes of one round's arrays (each way) for ``cfg`` and the encoder's fp32 bytes."""
    from shared_model.encoder import load_encoder

    model = build_model(cfg, num_categories)
    arrays = to_arrays(model)
    tensor_bytes, sent = payload_bytes(arrays)
    base_params = sum(p.numel() for p in load_encoder(cfg.base_model or None).parameters())
    encoder_bytes = base_params * 4
    _, fp16 = payload_bytes(_fp16(arrays))
    return {
        "user_tower": cfg.user_tower,
        "lora_mode": cfg.lora_mode if cfg.user_tower == "text" else None,
        "arrays": len(arrays),
        "parameters_sent": sum(int(arrays[k].numpy().size) for k in arrays.keys()),
        "tensor_bytes": tensor_bytes,
        "payload_bytes": sent,
        "proto_bytes": array_record_to_proto(arrays).ByteSize(),
        "received_payload_bytes": sent,  # the global arrays: same names and shapes
        "encoder_fp32_bytes": encoder_bytes,
        "payload_ratio": sent / encoder_bytes,
        "fp16_payload_bytes": fp16,
        "fp16_payload_ratio": fp16 / encoder_bytes,
    }


def traffic(dataset: str = "", base_model: str = "", goal: float = 0.002, log=lambda msg: None) -> dict[str, object]:
    """The sequence model and the text tower's two lora modes on the dataset's categories
    (default: bundled data and encoder); the goal is checked on the default config's row."""
    cfg = RunConfig.from_run_config({"dataset": dataset, "base-model": base_model})
    categories = load_catalogue(cfg.dataset_dir(), cfg.base_model or None, cfg.max_item_tokens).interest_vocab()
    rows = [measure(cfg.replace(**{"user-tower": "sequence"}), len(categories))]
    for mode in ("ffa", "fedavg"):
        log(f"traffic: text tower, lora-mode {mode}")
        rows.append(measure(cfg.replace(**{"user-tower": "text", "lora-mode": mode}), len(categories)))
    default = next(r for r in rows if r["user_tower"] == cfg.user_tower and r["lora_mode"] in (None, cfg.lora_mode))
    return {"default_user_tower": cfg.user_tower, "default_lora_mode": cfg.lora_mode, "rows": rows, "goal": goal,
            "payload_ratio": default["payload_ratio"], "met": default["payload_ratio"] <= goal,
            "bytes_per_round": default["payload_bytes"] + default["received_payload_bytes"]}
