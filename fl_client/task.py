"""Silo-side glue: find this node's silo, load its data once per process, and turn
examples into tensors.

Data flows one way: silo folder (+ public catalogue) → examples → token tensors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from shared_model.config import RunConfig
from shared_model.dataset import list_silos, load_catalogue, load_silo
from shared_model.encoder import shared_tokenizer
from shared_model.interest_features import FEATURES, history_features
from shared_model.examples import eval_examples, train_user_ids, training_example
from shared_model.item_index import ItemIndex, ItemTokens, build_item_index, tokenize_items
from shared_model.schema import Catalogue, Example, Silo
from shared_model.serialize import history_text

IGNORE_INDEX = -100


def resolve_silo_dir(cfg: RunConfig, node_config: dict[str, Any]) -> Path:
    """This node's silo folder.

    Deployment: node config ``silo-dir`` names the folder. Simulation: node config
    ``partition-id`` picks the silo in sorted order from the run's dataset.
    """
    if node_config.get("silo-dir"):
        return Path(str(node_config["silo-dir"])).expanduser().resolve()
    dataset = cfg.dataset_dir()
    silos = list_silos(dataset)
    pid = int(node_config.get("partition-id", -1))
    if not 0 <= pid < len(silos):
        raise ValueError(
            f"node has no silo-dir and partition-id {pid} is not in [0, {len(silos)}): "
            f"run one SuperNode per silo of {dataset}"
        )
    return dataset / "silos" / silos[pid]


def catalogue_dir_for(silo_dir: Path, node_config: dict[str, Any]) -> Path:
    """The public catalogue's dataset folder: node config ``catalogue-dir`` or the silo's dataset."""
    if node_config.get("catalogue-dir"):
        return Path(str(node_config["catalogue-dir"])).expanduser().resolve()
    return silo_dir.parent.parent


@lru_cache(maxsize=4)
def cached_catalogue(dataset_dir: Path) -> Catalogue:
    return load_catalogue(dataset_dir)


@lru_cache(maxsize=4)
def cached_silo(silo_dir: Path, dataset_dir: Path) -> Silo:
    return load_silo(silo_dir, cached_catalogue(dataset_dir))


@lru_cache(maxsize=4)
def cached_item_index(dataset_dir: Path, base_model: str, max_tokens: int) -> ItemIndex:
    return build_item_index(cached_catalogue(dataset_dir), base_model or None, max_tokens)


@lru_cache(maxsize=2)
def cached_item_tokens(dataset_dir: Path, base_model: str, max_tokens: int) -> ItemTokens:
    index = cached_item_index(dataset_dir, base_model, max_tokens)
    return tokenize_items(cached_catalogue(dataset_dir), index.item_ids, base_model or None, max_tokens)


@dataclass
class SiloData:
    """Everything a silo trains and evaluates on (its own data plus public data)."""

    name: str
    silo: Silo
    catalogue: Catalogue
    items: ItemIndex
    categories: list[str]
    item_prior_index: torch.Tensor  # per item row: its category index, len(categories) if none
    category_mask: torch.Tensor  # [C] bool: the categories of this silo's platform
    dataset_dir: Path | None = None
    base_model: str = ""
    max_item_tokens: int = 32

    @property
    def platform(self) -> str:
        return self.silo.platform

    @property
    def item_tokens(self) -> ItemTokens:
        """The catalogue tokenised for the adapted item tower (once per process)."""
        if self.dataset_dir is None:
            raise ValueError(f"silo {self.name}: no dataset folder to tokenise the catalogue from")
        return cached_item_tokens(self.dataset_dir, self.base_model, self.max_item_tokens)


def open_silo(cfg: RunConfig, node_config: dict[str, Any]) -> SiloData:
    silo_dir = resolve_silo_dir(cfg, node_config)
    dataset_dir = catalogue_dir_for(silo_dir, node_config)
    catalogue = cached_catalogue(dataset_dir)
    items = cached_item_index(dataset_dir, cfg.base_model, cfg.max_item_tokens)
    categories = catalogue.interest_vocab()
    silo = cached_silo(silo_dir, dataset_dir)
    return SiloData(
        name=silo_dir.name,
        silo=silo,
        catalogue=catalogue,
        items=items,
        categories=categories,
        item_prior_index=prior_index(catalogue, items, categories),
        category_mask=platform_category_mask(catalogue, categories, silo.platform),
        dataset_dir=dataset_dir,
        base_model=cfg.base_model,
        max_item_tokens=cfg.max_item_tokens,
    )


def platform_category_mask(catalogue: Catalogue, categories: list[str], platform: str) -> torch.Tensor:
    """``[C]`` bool: which next-interest classes occur on ``platform`` (public catalogue)."""
    present = {it.interest for it in catalogue.items.values() if it.platform == platform}
    return torch.tensor([c in present for c in categories], dtype=torch.bool)


def prior_index(catalogue: Catalogue, items: ItemIndex, categories: list[str]) -> torch.Tensor:
    """Each item row's category index (``len(categories)`` for unlabelled items)."""
    index = {c: i for i, c in enumerate(categories)}
    return torch.tensor(
        [index.get(catalogue.items[i].interest or "", len(categories)) for i in items.item_ids], dtype=torch.long
    )


class Encoder:
    """Example → (input ids, target item row, target category index, history features ``[C, F]``)."""

    def __init__(self, data: SiloData, cfg: RunConfig):
        self.data = data
        self.cfg = cfg
        self.tokenizer = shared_tokenizer(cfg.base_model)
        self.category_index = {c: i for i, c in enumerate(data.categories)}
        self._count = lru_cache(maxsize=65536)(lambda s: len(self.tokenizer.tokenize(s)))

    def __call__(self, ex: Example) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        budget = self.cfg.max_seq_len - 2  # [CLS] and [SEP]
        text = history_text(ex.history, self.data.catalogue, max_tokens=budget, count_tokens=self._count)
        ids = self.tokenizer(text, truncation=True, max_length=self.cfg.max_seq_len)["input_ids"]
        cat = self.category_index.get(ex.target_category, IGNORE_INDEX) if ex.target_category else IGNORE_INDEX
        feats = history_features(ex.history, self.data.catalogue, self.category_index, self.cfg.migration_k)
        return torch.tensor(ids, dtype=torch.long), self.data.items.row[ex.target.item_id], cat, feats


class TrainUsers(Dataset):
    """One item per training user; each access draws a fresh random cut of that user's history."""

    def __init__(self, data: SiloData, cfg: RunConfig, seed: int):
        self.data = data
        self.users = train_user_ids(data.silo)
        self.encode = Encoder(data, cfg)
        self.rng = random.Random(seed)
        self.k = cfg.migration_k

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        ex = training_example(self.data.silo, self.data.catalogue, self.users[i], rng=self.rng, k=self.k)
        return self.encode(ex)


def collate(batch: list[tuple[torch.Tensor, int, int, torch.Tensor]], pad_id: int = 0, num_categories: int = 0) -> tuple[torch.Tensor, ...]:
    """Pad to the longest history in the batch →
    (input_ids, attention_mask, item_rows, categories, history features ``[B, C, F]``)."""
    if not batch:
        empty = torch.zeros((0, 1), dtype=torch.long)
        feats = torch.zeros((0, num_categories, len(FEATURES)))
        return empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), feats
    longest = max(len(b[0]) for b in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for r, b in enumerate(batch):
        input_ids[r, : len(b[0])] = b[0]
        mask[r, : len(b[0])] = 1
    rows = torch.tensor([b[1] for b in batch], dtype=torch.long)
    cats = torch.tensor([b[2] for b in batch], dtype=torch.long)
    feats = torch.stack([b[3] for b in batch])
    return input_ids, mask, rows, cats, feats


def evaluation_examples(data: SiloData, cfg: RunConfig, split: str = "valid") -> list[Example]:
    """The silo's held-out examples; a seeded subset of ``max-eval-users`` when set."""
    examples = eval_examples(data.silo, data.catalogue, split, k=cfg.migration_k)
    if cfg.max_eval_users and len(examples) > cfg.max_eval_users:
        examples = random.Random(cfg.seed).sample(examples, cfg.max_eval_users)
    return examples
