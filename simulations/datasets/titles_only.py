"""A titles-only copy of a fedshift dataset: every ``category_path`` emptied, all else kept.

Used to test derived interests (:mod:`shared_model.derived_interests`) on real item titles.
``dataset.json`` loses its ``interest_level`` (there is no taxonomy left to choose from) and
gains ``"titles_only_of"``; silo files are copied unchanged. The copy is built in a temp folder
beside the target and renamed into place, so a failed run leaves nothing half-written.

    python -m simulations.datasets.titles_only data/amazon-art-office /tmp/ao-titles
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from shared_model.dataset import ITEM_COLUMNS, _find, load_dataset_info, read_catalogue
from shared_model.io_utils import write_bytes_atomic, write_csv


def make_titles_only(src: Path, dst: Path) -> Path:
    """Write the titles-only copy of ``src`` to ``dst`` (which must not exist); returns ``dst``."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    catalogue = read_catalogue(src)
    items_file = _find(src, "items")
    assert items_file is not None  # read_catalogue raised otherwise
    info = load_dataset_info(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        rows = [(it.item_id, it.platform, it.title, "", it.brand) for it in catalogue.items.values()]
        write_csv(tmp / items_file.name, ITEM_COLUMNS, rows)
        info.pop("interest_level", None)
        info["titles_only_of"] = info.get("name", src.name)
        info["name"] = dst.name
        write_bytes_atomic(tmp / "dataset.json", (json.dumps(info, indent=2) + "\n").encode("utf-8"))
        if (src / "silos").is_dir():
            shutil.copytree(src / "silos", tmp / "silos", symlinks=False)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.datasets.titles_only",
                                description="Copy a fedshift dataset with every category_path emptied.")
    p.add_argument("src", type=Path, help="dataset folder to copy")
    p.add_argument("dst", type=Path, help="new folder (must not exist)")
    a = p.parse_args(argv)
    print(make_titles_only(a.src, a.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
