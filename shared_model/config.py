"""The run configuration: every knob of ``[tool.flwr.app.config]`` as one typed object.

The defaults in ``pyproject.toml`` are the ``quick`` preset; :data:`PRESETS` holds the
overrides that ``fedshift simulate --preset NAME`` passes as Flower run-config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Run-config overrides per preset (keys as in ``[tool.flwr.app.config]``).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "full": {
        "num-server-rounds": 10,
        "local-steps": 40,
        "batch-size": 64,
        "max-seq-len": 128,
        "max-eval-users": 0,
    },
}


#: ``frozen``: base-encoder item embeddings, cached once per base model (shared_model.item_index);
#: ``adapted``: items re-encoded by the LoRA encoder inside each example's forward.
ITEM_TOWERS = ("frozen", "adapted")


@dataclass(frozen=True)
class RunConfig:
    """Typed view of the Flower run config (``context.run_config``)."""

    dataset: str = ""
    base_model: str = ""
    out_dir: str = ""
    seed: int = 42
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    min_nodes: int = 2
    device: str = "auto"
    # text / encoder
    max_seq_len: int = 64
    max_item_tokens: int = 32
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "query,value"
    # heads and loss
    item_tower: str = "frozen"
    num_negatives: int = 255
    tower_negatives: int = 15
    logit_scale: float = 20.0
    category_prior_weight: float = 1.0
    item_loss_weight: float = 1.0
    category_loss_weight: float = 1.0
    history_features: bool = True
    migration_k: int = 5
    # optimisation
    learning_rate: float = 3e-3
    head_learning_rate: float = 0.1
    local_steps: int = 8
    batch_size: int = 32
    # differential privacy
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    # privacy ledger and budget enforcement (fl_client/ledger.py)
    state_dir: str = ""
    silo_lifetime_epsilon: float = 0.0
    audit_broken_noise: bool = False
    # evaluation
    max_eval_users: int = 256
    eval_batch_size: int = 64
    eval_candidates: int = 1000
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.item_tower not in ITEM_TOWERS:
            raise ValueError(f"config item-tower = {self.item_tower!r}: expected one of {', '.join(ITEM_TOWERS)}")
        if self.item_tower == "adapted" and self.tower_negatives < 1:
            raise ValueError(f"config tower-negatives = {self.tower_negatives}: the adapted tower needs at least 1")
        if self.item_tower == "adapted" and self.dp and self.grad_sample_mode == "ew":
            raise ValueError("config item-tower = 'adapted' needs grad-sample-mode 'hooks' or 'functorch' "
                             "(per-row gradients are summed per example; 'ew' has no per-row gradients)")

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunConfig":
        """Build from Flower's run config; unknown keys are kept in ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in names and name != "extra":
                kwargs[name] = _coerce(cls, name, value)
            else:
                extra[key] = value
        return cls(**kwargs, extra=extra)

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config` (dashed keys, no ``extra``)."""
        return {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra"
        }

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def dataset_dir(self) -> Path:
        """``dataset`` as an absolute folder; empty → the bundled dataset."""
        return Path(self.dataset).expanduser().resolve() if self.dataset else bundled_dataset()


def bundled_dataset() -> Path:
    """The bundled dataset folder of the installed project.

    ``flwr run`` executes the app from a copy of its Python files (the FAB) that leaves out
    the compressed data, so when the folder next to this module has no catalogue, fall
    back to the source checkout that ``pip install -e .`` recorded.
    """
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    from shared_model.dataset import DEFAULT_DATASET

    candidates = [DEFAULT_DATASET]
    try:
        direct = metadata.distribution("fedshift").read_text("direct_url.json")
        if direct:
            url = json.loads(direct).get("url", "")
            if url.startswith("file://"):
                candidates.append(Path(unquote(urlparse(url).path)) / "data" / DEFAULT_DATASET.name)
    except metadata.PackageNotFoundError:
        pass
    for folder in candidates:
        if any((folder / name).is_file() for name in ("items.csv", "items.csv.gz")):
            return folder
    return DEFAULT_DATASET


def _coerce(cls: type, name: str, value: Any) -> Any:
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return str(value)
