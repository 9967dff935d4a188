"""Shared fixtures: a tiny random BERT, a small generated dataset, a private cache."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist: each worker its own temp root, so the Flower and Ray processes a test looks for
# (by their temp folders, e.g. fedshift-flwr-*) are its worker's only; short, as Ray puts its
# sockets under it and socket paths are length-limited.
if (_worker := os.environ.get("PYTEST_XDIST_WORKER")):
    os.environ["TMPDIR"] = tempfile.mkdtemp(prefix=f"fsx-{_worker}-", dir="/tmp")
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    atexit.register(shutil.rmtree, os.environ["TMPDIR"], ignore_errors=True)
# Silo ledgers default to ~/.local/share/fedshift; tests must never write there.
os.environ.setdefault("FEDSHIFT_STATE", tempfile.mkdtemp(prefix="fedshift-test-state-"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private item-embedding cache, so tests never depend on ~/.cache."""
    folder = tmp_path_factory.mktemp("fedshift-cache")
    os.environ["FEDSHIFT_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shared_model.encoder import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 platforms × 1 region, 240 users: 3 silos with planted migration."""
    from simulations.datasets.generator import generate

    out = tmp_path_factory.mktemp("gen") / "ds"
    generate(out, users=240, platforms=3, regions=1, seed=1)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 platforms × 2 regions, 40 users: a fresh copy per test module (tests edit it)."""
    from simulations.datasets.generator import generate

    d = tmp_path_factory.mktemp("base") / "ds"
    generate(d, users=40, platforms=2, regions=2, seed=3)
    return d
