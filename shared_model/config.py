"""The run configuration: every knob of ``[tool.flwr.app.config]`` as one typed object.

``pyproject.toml`` ``[tool.flwr.app.config]`` and the field defaults below are the same
numbers (``tests/test_config.py`` holds them equal); they are the ``quick`` preset, and
:data:`PRESETS` holds the overrides that ``fedshift simulate --preset NAME`` applies.

Every value is checked for type and range when a config is built: an unknown key, a value
of the wrong type (``dp=ture``, ``epsilon=abc``) or out of range (``epsilon=0``,
``delta=2``, ``local-steps=0``) raises :class:`ConfigError` naming the key, before anything
starts or is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Run-config overrides per preset (keys as in ``[tool.flwr.app.config]``).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "full": {
        "num-server-rounds": 10,
        "local-steps": 30,
        "max-eval-users": 0,
    },
    # the text tower (LoRA-adapted BERT over the history's text) at the settings it was tuned with
    "text": {
        "user-tower": "text",
        "local-steps": 8,
        "batch-size": 32,
        "head-learning-rate": 0.1,
        "num-negatives": 255,
    },
}


#: ``frozen``: base-encoder item embeddings, cached once per base model (shared_model.item_index);
#: ``adapted``: items re-encoded by the LoRA encoder inside each example's forward.
ITEM_TOWERS = ("frozen", "adapted")

#: ``sequence``: the history read as a sequence of item vectors (shared_model/sequence_model.py);
#: ``text``: the history serialised as text and encoded by the LoRA-adapted BERT (shared_model/model.py).
USER_TOWERS = ("sequence", "text")

#: ``fedavg``: both LoRA factors A and B are trained and averaged (mean(B)·mean(A) ≠ mean(B·A));
#: ``ffa``: FFA-LoRA (Sun et al., ICLR 2024), A frozen at its seeded initialisation on every
#: silo and only B (+ heads) trained and averaged, so the global ΔW is the exact weighted mean.
LORA_MODES = ("fedavg", "ffa")


class ConfigError(ValueError):
    """A run-config key that is unknown or a value of the wrong type or range: ``str(e)``
    is one line, ``config KEY = VALUE: reason``."""


ACCOUNTANTS = ("rdp", "prv", "gdp")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")
DEVICES = ("auto", "cpu", "cuda")

#: Range rules: key → (predicate, what it must be). Checked in :meth:`RunConfig.__post_init__`.
_POSITIVE = (lambda v: v > 0, "must be > 0")
_AT_LEAST_1 = (lambda v: v >= 1, "must be ≥ 1")
_NON_NEGATIVE = (lambda v: v >= 0, "must be ≥ 0")
RULES: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: 0 <= v < 2**63, "must be in [0, 2^63)"),
    "num-server-rounds": _AT_LEAST_1,
    "fraction-train": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "min-nodes": _AT_LEAST_1,
    "device": (lambda v: v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()), "must be auto, cpu, cuda or cuda:N"),
    "max-seq-len": (lambda v: v >= 8, "must be ≥ 8 tokens"),
    "max-item-tokens": (lambda v: v >= 4, "must be ≥ 4 tokens"),
    "lora-rank": _AT_LEAST_1,
    "lora-alpha": _POSITIVE,
    "lora-dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "lora-target-modules": (lambda v: any(m.strip() for m in v.split(",")), "must name at least one module"),
    "lora-mode": (lambda v: v in LORA_MODES, f"must be one of {', '.join(LORA_MODES)}"),
    "item-tower": (lambda v: v in ITEM_TOWERS, f"must be one of {', '.join(ITEM_TOWERS)}"),
    "user-tower": (lambda v: v in USER_TOWERS, f"must be one of {', '.join(USER_TOWERS)}"),
    "max-history": _AT_LEAST_1,
    "history-lags": _AT_LEAST_1,
    "other-platform-lags": (lambda v: 0 <= v <= 50, "must be in [0, 50]"),
    "transition-lags": _AT_LEAST_1,
    "item-adaptor-rank": _NON_NEGATIVE,
    "loss-top-k": _NON_NEGATIVE,
    "interest-clip-share": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "physical-batch-size": _AT_LEAST_1,
    "warmup-steps": _NON_NEGATIVE,
    "num-negatives": _NON_NEGATIVE,
    "tower-negatives": _NON_NEGATIVE,
    "logit-scale": _POSITIVE,
    "category-prior-weight": _NON_NEGATIVE,
    "item-loss-weight": _NON_NEGATIVE,
    "category-loss-weight": _NON_NEGATIVE,
    "migration-k": _AT_LEAST_1,
    "popularity-max-items": _AT_LEAST_1,
    "popularity-epsilon-share": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "popularity-threshold": _NON_NEGATIVE,
    "transition-max-pairs": _AT_LEAST_1,
    "transition-neighbours": _NON_NEGATIVE,
    "transition-popular": _NON_NEGATIVE,
    "transition-epsilon-share": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "transition-threshold": _NON_NEGATIVE,
    "learning-rate": _POSITIVE,
    "head-learning-rate": _NON_NEGATIVE,
    "local-steps": _AT_LEAST_1,
    "batch-size": _AT_LEAST_1,
    "epsilon": _POSITIVE,
    "delta": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "max-grad-norm": _POSITIVE,
    "accountant": (lambda v: v in ACCOUNTANTS, f"must be one of {', '.join(ACCOUNTANTS)}"),
    "grad-sample-mode": (lambda v: v in GRAD_SAMPLE_MODES, f"must be one of {', '.join(GRAD_SAMPLE_MODES)}"),
    "silo-lifetime-epsilon": _NON_NEGATIVE,
    "release-metrics": (lambda v: v in ("none", "dp", "plain"), "must be one of none, dp, plain"),
    "secagg-threshold": (lambda v: 0 < v <= 1 or (v > 1 and v == int(v)), "must be a fraction in (0, 1] or a whole count > 1"),
    "max-eval-users": _NON_NEGATIVE,
    "eval-batch-size": _AT_LEAST_1,
    "eval-candidates": _NON_NEGATIVE,
}


@dataclass(frozen=True)
class RunConfig:
    """Typed view of the Flower run config (``context.run_config``)."""

    dataset: str = ""
    base_model: str = ""
    out_dir: str = ""
    # a resumed run (fedshift simulate/deploy local --resume): the ORIGINAL run's id, under
    # which each silo charges its rounds (its own ledger decides what that run has spent)
    resume_run_id: str = ""
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
    lora_mode: str = "ffa"
    # the user tower (docs/model.md): sequence = item vectors of the history; text = LoRA-BERT over its text
    user_tower: str = "sequence"
    max_history: int = 50  # sequence: the newest events a window holds
    history_lags: int = 10  # sequence: the query pools the last this many item vectors (learned weights)
    # sequence: with > 0, the query reads a mixed history (region silos) as the last history-lags items on the
    # target's platform plus the last this many on the others (weights from 0); 0 = the window as it is
    other_platform_lags: int = 0
    transition_lags: int = 5  # sequence: the transition term reads the last this many items' pairs
    transition_weight: float = 0.0  # sequence: initial weight of the transition term (trained)
    item_adaptor_rank: int = 32  # sequence: rank of the learned linear item adaptor (0 = none)
    loss_top_k: int = 20  # sequence: the next-item loss is a softmax over the target and the k hardest items,
    # at positions whose target ranks within them (0: a softmax over the sampled num-negatives, or the catalogue)
    interest_clip_share: float = 0.5  # sequence: the next-interest head's share of max-grad-norm² (group clipping)
    physical_batch_size: int = 64  # sequence: examples per forward pass (Opacus BatchMemoryManager)
    warmup_steps: int = 0  # sequence: linear learning-rate warm-up over this many steps of each round
    # heads and loss
    item_tower: str = "frozen"
    num_negatives: int = 4096
    tower_negatives: int = 15
    logit_scale: float = 20.0
    category_prior_weight: float = 1.0
    # whether the item loss trains the next-interest head through category-prior-weight·log p(category)
    category_prior_gradient: bool = False
    item_loss_weight: float = 1.0
    category_loss_weight: float = 1.0
    history_features: bool = True
    migration_k: int = 5
    # DP popularity prior (shared_model/popularity.py, docs/popularity-prior.md): each silo releases
    # a Gaussian histogram of its training users' items; item score += w·log prior (w trained)
    popularity_prior: bool = True
    popularity_max_items: int = 8  # c: a user's most recent distinct items counted (unit weight each)
    popularity_epsilon_share: float = 0.1  # the release's marginal share of ε (PrivacyState.calibrate)
    popularity_threshold: float = 3.0  # summed counts below this many noise std are treated as 0
    popularity_weight: float = 1.0  # initial w (then trained under DP-SGD like the heads)
    # DP item-transition release (shared_model/transitions.py, docs/transitions.md): each silo releases
    # Gaussian counts of its training users' item-to-item transitions over a public candidate set
    transitions: bool = True
    transition_max_pairs: int = 8  # m: a user's most recent distinct unordered pairs counted (L2 sensitivity √m)
    transition_neighbours: int = 50  # candidate pairs: each item with its nearest items by text cosine
    transition_popular: int = 100  # … and with each of the platform's most popular items (DP popularity)
    transition_epsilon_share: float = 0.3  # the release's marginal share of ε (PrivacyState.calibrate)
    transition_threshold: float = 5.0  # summed counts ≤ this many noise std are dropped
    last_item_score: bool = True
    last_item_weight: float = 0.75  # b (chosen on validation users; docs/popularity-prior.md)
    # optimisation
    learning_rate: float = 3e-3
    head_learning_rate: float = 0.03
    local_steps: int = 8
    batch_size: int = 512
    # differential privacy
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    # privacy requests a silo's own policy must allow (shared_model/privacy/policy.py);
    # where a silo keeps its ledger is node config state-dir, never the run config
    silo_lifetime_epsilon: float = 0.0
    audit_broken_noise: bool = False
    release_metrics: str = "dp"  # asked; the silo's policy may only make it more private
    # secure aggregation (docs/secure-aggregation.md): the server learns only the weighted sum
    secure_aggregation: bool = False
    secagg_threshold: float = 0.5  # ≤ 1: fraction of the round's silos; > 1: a count (never below a majority)
    # evaluation
    max_eval_users: int = 256
    eval_batch_size: int = 64
    eval_candidates: int = 1000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            key = f.name.replace("_", "-")
            value = _coerce(key, f.default, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            rule = RULES.get(key)
            if rule and not rule[0](value):
                raise ConfigError(f"config {key} = {value!r}: {rule[1]}")
        if self.popularity_prior and self.transitions and \
                self.popularity_epsilon_share + self.transition_epsilon_share >= 1:
            raise ConfigError(f"config popularity-epsilon-share = {self.popularity_epsilon_share!r} + "
                              f"transition-epsilon-share = {self.transition_epsilon_share!r}: must be < 1 (DP-SGD "
                              "gets what the two releases leave of epsilon)")
        if self.user_tower == "text" and self.num_negatives < 1:
            raise ConfigError(f"config num-negatives = {self.num_negatives}: the text tower needs at least 1 "
                              "(0, the whole catalogue, is the sequence model's)")
        if self.item_tower == "adapted" and self.tower_negatives < 1:
            raise ConfigError(f"config tower-negatives = {self.tower_negatives}: the adapted tower needs at least 1")
        if self.item_tower == "adapted" and self.dp and self.grad_sample_mode == "ew":
            raise ConfigError("config item-tower = 'adapted' needs grad-sample-mode 'hooks' or 'functorch' "
                              "(per-row gradients are summed per example; 'ew' has no per-row gradients)")

    @classmethod
    def keys(cls) -> list[str]:
        """Every run-config key (dashed), in declaration order."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunConfig":
        """Build from Flower's run config (dashed keys); missing keys take their defaults.

        Raises :class:`ConfigError` for an unknown key or a bad value."""
        known = set(cls.keys())
        unknown = sorted(k for k in run_config if k not in known)
        if unknown:
            raise ConfigError(f"config {unknown[0]}: unknown key (known keys: pyproject.toml [tool.flwr.app.config])")
        return cls(**{k.replace("-", "_"): v for k, v in run_config.items()})

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config` (dashed keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **dashed: Any) -> "RunConfig":
        """A new, validated config with some values changed, by dashed key:
        ``cfg.replace(**{"num-server-rounds": 3, "dp": False})``."""
        return self.from_run_config({**self.to_run_config(), **dashed})

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


def _coerce(key: str, default: Any, value: Any) -> Any:
    """``value`` as the type of ``default``, strictly: a bool is ``true``/``false`` (or a real
    bool), a number must parse whole and be finite; anything else raises :class:`ConfigError`."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"config {key} = {value!r}: {why}")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
            return value.strip().lower() == "true"
        raise bad("expected true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise bad("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad("expected an integer")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise bad("expected a number")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise bad("expected a number") from None
        if not math.isfinite(number):
            raise bad("expected a finite number")
        return number
    if not isinstance(value, str):
        raise bad("expected a string")
    return value
