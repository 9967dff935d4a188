"""`fedshift simulate` and `deploy local` hand `flwr run` a copy of the app's FAB files
(fedshift.flower_processes.app_files) so Flower does not walk the `.venv`; the copy must hold
exactly what Flower's own `flwr run APP_DIR` would have packed."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.cli.utils import collect_files, filter_paths_for_publish

from fedshift.flower_processes import APP_DIR, app_files, copy_app


def _flower(app: Path) -> set[str]:
    return set(filter_paths_for_publish(collect_files(app)))


def test_the_repository_gives_flowers_own_file_set() -> None:
    mine = app_files(APP_DIR)
    assert set(mine) == _flower(APP_DIR)
    assert {"pyproject.toml", "fl_client/client_app.py", "fl_server/server_app.py"} <= set(mine)


def test_an_awkward_folder_gives_flowers_own_file_set(tmp_path: Path) -> None:
    app = tmp_path / "app"
    files = {
        "pyproject.toml": "[project]\nname = 'x'\n", ".gitignore": "runs/\n*.log\nsecret.json\n!keep.json\n",
        "pkg/a.py": "", "pkg/deep/b.json": "{}", "pkg/__pycache__/a.py": "", "pkg/notes.txt": "",
        ".venv/lib/site.py": "", "runs/r1/metrics.json": "{}", "runs/keep.json": "{}", "secret.json": "{}",
        "keep.json": "{}", ".git/info/x.json": "{}", "data/dataset.json": "{}", "data/items.csv": "",
        "README.md": "", "x.log": "",
    }
    for rel, text in files.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    os.symlink(app / "pkg" / "a.py", app / "pkg" / "link.py")
    mine = set(app_files(app))
    assert mine == _flower(app)
    assert "pkg/a.py" in mine and not {".venv/lib/site.py", "pkg/link.py", "pkg/__pycache__/a.py"} & mine
    copied = copy_app(tmp_path / "copy", app)
    assert {p.relative_to(copied).as_posix() for p in copied.rglob("*") if p.is_file()} == mine
    assert _flower(copied) == mine  # `flwr run COPY` packs the same files


def test_without_negations_ignored_folders_are_skipped_whole(tmp_path: Path) -> None:
    app = tmp_path / "app"
    for rel in ("pyproject.toml", ".gitignore", "pkg/a.py", "runs/r1/metrics.json", ".venv/lib/site.py"):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text("runs/\n" if rel == ".gitignore" else "")
    assert set(app_files(app)) == _flower(app) == {"pyproject.toml", ".gitignore", "pkg/a.py"}
