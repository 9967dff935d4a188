"""A dataset's layouts: the same users cut into silos another way (``layouts/<name>/``, each a
dataset folder; docs/data-format.md), and the run-config default a layout with region silos
needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared_model.dataset import list_silos

LAYOUTS_DIR = "layouts"  # a dataset's other layouts of the same users: <dataset>/layouts/<name>/, each a dataset


def layouts(dataset_dir: Path) -> list[str]:
    """The layouts a dataset folder offers: ``platforms`` (the folder itself) and each
    ``layouts/<name>/`` that holds a ``silos/`` folder."""
    root = Path(dataset_dir) / LAYOUTS_DIR
    extra = sorted(p.name for p in root.iterdir() if (p / "silos").is_dir()) if root.is_dir() else []
    return ["platforms", *[n for n in extra if n != "platforms"]]


def layout_dir(dataset_dir: Path, layout: str | None) -> Path:
    """The dataset folder of ``layout``: the folder itself for ``platforms`` (or none), else
    ``layouts/<layout>/``; a ValueError naming the layouts there when it has no such layout."""
    dataset_dir = Path(dataset_dir)
    if not layout or layout == "platforms":
        return dataset_dir
    if layout in layouts(dataset_dir):
        return dataset_dir / LAYOUTS_DIR / layout
    raise ValueError(f"{dataset_dir} has no layout {layout!r} (it has: {', '.join(layouts(dataset_dir))}; "
                     f"a layout is a dataset folder {dataset_dir / LAYOUTS_DIR}/<name>/)")


def has_region_silos(dataset_dir: Path) -> bool:
    """Whether a silo of the dataset declares several platforms in its ``silo.json`` (read
    loosely: a malformed file is the loader's to report)."""
    for name in list_silos(dataset_dir):
        p = Path(dataset_dir) / "silos" / name / "silo.json"
        try:
            plats = json.loads(p.read_text(encoding="utf-8")).get("platforms") if p.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(plats, list) and len(set(map(str, plats))) > 1:
            return True
    return False


#: ``other-platform-lags`` that simulate and experiment use on a dataset with region silos, unless set
REGION_OTHER_PLATFORM_LAGS = 5


def with_region_defaults(values: Mapping[str, Any], dataset_dir: Path) -> dict[str, Any]:
    """``values`` (run-config items, dashed keys) plus ``other-platform-lags =``
    :data:`REGION_OTHER_PLATFORM_LAGS` when ``dataset_dir`` has region silos and ``values``
    does not set it: the sequence model then reads a mixed history per target platform
    (``fedshift simulate`` and every run of ``fedshift experiment``)."""
    out = dict(values)
    if "other-platform-lags" not in out and has_region_silos(Path(dataset_dir)):
        out["other-platform-lags"] = REGION_OTHER_PLATFORM_LAGS
    return out
