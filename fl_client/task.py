"""Silo-side glue: find this node's silo and load its data once per process.

Data flows one way: silo folder (+ public catalogue) → examples → token tensors
(:class:`shared_model.batches.ExampleBatcher`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from shared_model.batches import ExampleBatcher, platform_category_mask, prior_index
from shared_model.config import RunConfig
from shared_model.dataset import federation_mismatch, list_silos, load_catalogue, load_silo, read_catalogue
from shared_model.examples import eval_examples, train_user_ids, training_example
from shared_model.item_index import ItemIndex, ItemTokens, build_item_index, tokenize_items
from shared_model.schema import Catalogue, Example, Silo
from shared_model.sequence_loss import ItemSpace
from shared_model.sequences import SequenceBatcher, row_platforms

def resolve_silo_dir(cfg: RunConfig, node_config: dict[str, Any]) -> Path:
    """This node's silo folder.

    Deployment: node config ``silo-dir`` names the folder. Simulation: node config
    ``partition-id`` picks the silo in sorted order from the run's dataset; a federation
    whose ``num-partitions`` is not the dataset's silo count is refused (a plain ``flwr run .``
    must train every silo, or fail saying how many SuperNodes to start).
    """
    if node_config.get("silo-dir"):
        return Path(str(node_config["silo-dir"])).expanduser().resolve()
    dataset = cfg.dataset_dir()
    silos = list_silos(dataset)
    if (problem := federation_mismatch(node_config.get("num-partitions"), dataset, silos)) is not None:
        raise ValueError(problem)
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
def cached_catalogue(dataset_dir: Path, base_model: str, max_tokens: int) -> Catalogue:
    """The catalogue with its interest classes (derived ones from this encoder's embeddings)."""
    return load_catalogue(dataset_dir, base_model or None, max_tokens)


@lru_cache(maxsize=4)
def cached_items(dataset_dir: Path) -> Catalogue:
    """The catalogue as read (interests unset): enough for silo files and the item texts."""
    return read_catalogue(dataset_dir)


@lru_cache(maxsize=4)
def cached_silo(silo_dir: Path, dataset_dir: Path) -> Silo:
    return load_silo(silo_dir, cached_items(dataset_dir))


@lru_cache(maxsize=4)
def cached_item_index(dataset_dir: Path, base_model: str, max_tokens: int) -> ItemIndex:
    return build_item_index(cached_items(dataset_dir), base_model or None, max_tokens)


@lru_cache(maxsize=2)
def cached_item_tokens(dataset_dir: Path, base_model: str, max_tokens: int) -> ItemTokens:
    index = cached_item_index(dataset_dir, base_model, max_tokens)
    return tokenize_items(cached_items(dataset_dir), index.item_ids, base_model or None, max_tokens)


@dataclass
class SiloData:
    """Everything a silo trains and evaluates on (its own data plus public data)."""

    name: str
    silo: Silo
    catalogue: Catalogue
    items: ItemIndex
    categories: list[str]
    item_prior_index: torch.Tensor  # per item row: its category index, len(categories) if none
    category_mask: torch.Tensor  # [C] bool: the categories of this silo's platforms
    dataset_dir: Path | None = None
    base_model: str = ""
    max_item_tokens: int = 32

    @property
    def platform(self) -> str:
        """The platform of a one-platform silo (a region silo raises: use :attr:`platforms`)."""
        return self.silo.platform

    @property
    def platforms(self) -> tuple[str, ...]:
        return self.silo.platforms

    def platform_mask(self, platform: str) -> torch.Tensor:
        """``[C]`` bool: the next-interest classes of one platform (public catalogue; computed
        once per platform, as each round's training and evaluation ask again)."""
        return self._platform_masks[platform]

    @cached_property
    def _platform_masks(self) -> dict[str, torch.Tensor]:
        return {p: platform_category_mask(self.catalogue, self.categories, p) for p in self.catalogue.platforms}

    def platform_rows(self) -> torch.Tensor:
        """The item rows of the silo's platforms (one platform's, or a region silo's several), ascending."""
        return torch.cat([self.items.platform_rows(p) for p in self.platforms]).sort().values

    @property
    def item_tokens(self) -> ItemTokens:
        """The catalogue tokenised for the adapted item tower (once per process)."""
        if self.dataset_dir is None:
            raise ValueError(f"silo {self.name}: no dataset folder to tokenise the catalogue from")
        return cached_item_tokens(self.dataset_dir, self.base_model, self.max_item_tokens)

    def sequence_batcher(self, cfg: RunConfig) -> SequenceBatcher:
        """This silo's histories → the sequence model's windows (item vectors from the index)."""
        return SequenceBatcher(self.items.row, self.items.embeddings, self.item_prior_index, len(self.categories),
                               cfg.max_history, cfg.migration_k, self.row_platform)

    def item_space(self, device: torch.device) -> ItemSpace:
        """The public per-item tensors the sequence loss scores with, on ``device``; a region
        silo's also say each item's platform and each platform's classes, so every position is
        scored against its target's platform."""
        space = ItemSpace(self.items.embeddings.to(device), self.item_prior_index.to(device),
                          self.platform_rows().to(device), self.category_mask.to(device))
        if self.silo.mixed:
            space.item_platform = self.row_platform.to(device)
            space.platform_masks = torch.stack([self.platform_mask(p) for p in self.catalogue.platforms]).to(device)
        return space

    @cached_property
    def row_platform(self) -> torch.Tensor:
        """``[N]`` each item row's platform: its index in the catalogue's platforms."""
        return row_platforms(self.catalogue, self.items.item_ids)

    def batcher(self, cfg: RunConfig) -> ExampleBatcher:
        """This silo's examples → tensors (target rows in this silo's item index)."""
        return ExampleBatcher(self.catalogue, self.categories, cfg, self.items.row)


def open_silo(cfg: RunConfig, node_config: dict[str, Any]) -> SiloData:
    silo_dir = resolve_silo_dir(cfg, node_config)
    dataset_dir = catalogue_dir_for(silo_dir, node_config)
    catalogue = cached_catalogue(dataset_dir, cfg.base_model, cfg.max_item_tokens)
    items = cached_item_index(dataset_dir, cfg.base_model, cfg.max_item_tokens)
    categories = catalogue.interest_vocab()
    silo = cached_silo(silo_dir, dataset_dir)
    if silo.mixed and cfg.user_tower != "sequence":
        raise ValueError(f"silo {silo_dir.name} holds platforms {', '.join(silo.platforms)} (a region silo); "
                         f"user-tower = {cfg.user_tower!r} trains one-platform silos only: use user-tower = \"sequence\"")
    return SiloData(
        name=silo_dir.name,
        silo=silo,
        catalogue=catalogue,
        items=items,
        categories=categories,
        item_prior_index=prior_index(catalogue, items.item_ids, categories),
        category_mask=torch.stack([platform_category_mask(catalogue, categories, p) for p in silo.platforms]).any(0),
        dataset_dir=dataset_dir,
        base_model=cfg.base_model,
        max_item_tokens=cfg.max_item_tokens,
    )


class TrainUsers(Dataset):
    """One item per training user; each access draws a fresh random cut of that user's history."""

    def __init__(self, data: SiloData, cfg: RunConfig, seed: int):
        self.data = data
        self.users = train_user_ids(data.silo)
        self.encode = data.batcher(cfg)
        self.rng = random.Random(seed)
        self.k = cfg.migration_k

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        ex = training_example(self.data.silo, self.data.catalogue, self.users[i], rng=self.rng, k=self.k)
        return self.encode(ex)


def evaluation_examples(data: SiloData, cfg: RunConfig, split: str = "valid") -> list[Example]:
    """The silo's held-out examples; a seeded subset of ``max-eval-users`` when set."""
    examples = eval_examples(data.silo, data.catalogue, split, k=cfg.migration_k)
    if cfg.max_eval_users and len(examples) > cfg.max_eval_users:
        examples = random.Random(cfg.seed).sample(examples, cfg.max_eval_users)
    return examples
