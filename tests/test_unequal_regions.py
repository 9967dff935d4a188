"""The unequal-silo setting (simulations/datasets/unequal_regions.py) on generated data: the
re-partition is deterministic, keeps every user exactly once with all their splits and events,
gives the small region about its share, leaves the catalogue untouched; bad input is one line,
exit 2, nothing written. Also the experiment's dry run on the view (no training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedshift.cli import main
from shared_model.dataset import list_silos, load_silo, read_catalogue
from shared_model.item_index import catalogue_hash
from simulations.datasets import unequal_regions as ur
from simulations.datasets.generator import generate


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 platforms × 2 regions, 600 users (every user on both platforms)."""
    d = tmp_path_factory.mktemp("uneq") / "ds"
    generate(d, users=600, platforms=2, regions=2, seed=5)
    return d


def silos_of(dataset: Path) -> dict:
    cat = read_catalogue(dataset)
    return {s: load_silo(dataset / "silos" / s, cat) for s in list_silos(dataset)}


def test_every_user_once_with_all_splits_and_events(source: Path, tmp_path: Path) -> None:
    view = ur.write_regions(ur.plan_regions(source, 0.2, seed=0), tmp_path / "view")
    old, new = silos_of(source), silos_of(view)
    assert sorted(new) == ["p0-large", "p0-small", "p1-large", "p1-small"]
    for p in ("p0", "p1"):
        before = {u: (s.splits[u], s.histories[u]) for s in old.values() if s.platform == p for u in s.splits}
        large, small = new[f"{p}-large"], new[f"{p}-small"]
        assert large.platform == small.platform == p
        assert not set(large.splits) & set(small.splits)  # nobody in both regions
        after = {u: (s.splits[u], s.histories[u]) for s in (large, small) for u in s.splits}
        assert after == before  # every user exactly once, same split, same events in the same order
        # the rule, recomputed: small exactly when the user's hash position is below the share
        assert set(small.splits) == {u for u in before if ur.user_position(u, 0) < 0.2}
        share = len(small.splits) / len(before)
        assert 0.14 < share < 0.26, share  # binomial: 600 users, sd 0.016
        assert {v for v in small.splits.values()} == {"train", "valid", "test"}
    # a user lives in the same region on every platform (the hash ignores the platform)
    assert set(new["p0-small"].splits) & set(new["p1-large"].splits) == set()


def test_catalogue_untouched_and_hard_linked(source: Path, tmp_path: Path) -> None:
    view = ur.write_regions(ur.plan_regions(source, 0.2), tmp_path / "view")
    items = next(n for n in ("items.csv", "items.csv.gz") if (source / n).is_file())
    assert os.stat(view / items).st_ino == os.stat(source / items).st_ino
    assert (view / "dataset.json").read_bytes() == (source / "dataset.json").read_bytes()
    assert catalogue_hash(read_catalogue(view)) == catalogue_hash(read_catalogue(source))
    assert main(["data", "validate", str(view)]) == 0


def test_deterministic_and_reused(source: Path, tmp_path: Path) -> None:
    a, b = ur.plan_regions(source, 0.2, seed=3), ur.plan_regions(source, 0.2, seed=3)
    assert a.files == b.files and a.record == b.record
    assert ur.plan_regions(source, 0.2, seed=4).files != a.files  # the seed is part of the hash
    view = ur.write_regions(a, tmp_path / "view")
    rec = json.loads((view / ur.RECORD_FILE).read_text())
    assert rec["share"] == 0.2 and rec["sha256"] == a.record["sha256"]
    assert rec["silos"]["p0-small"]["users"] == len(silos_of(view)["p0-small"].splits)
    inode = os.stat(view / "silos" / "p0-small" / "users.csv").st_ino
    ur.write_regions(b, tmp_path / "view")  # the same view: kept as is
    assert os.stat(view / "silos" / "p0-small" / "users.csv").st_ino == inode
    ur.write_regions(ur.plan_regions(source, 0.3, seed=3), tmp_path / "view")  # another view: replaced
    assert json.loads((view / ur.RECORD_FILE).read_text())["share"] == 0.3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.parametrize("share", ["0", "0.6", "-0.1", "nan"])
def test_bad_share_is_one_line_exit_2_nothing_written(share: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["experiment", "--preset", "paper", "--dry-run", "--out", str(out),
                 f"--small-region-share={share}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(0, 0.5]" in err, err
    assert not out.exists()
    assert ur.main([str(tmp_path), str(tmp_path / "v"), "--share", share]) == 2
    assert not (tmp_path / "v").exists()


def test_platform_too_small_is_one_line_exit_2_nothing_written(base: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # 40 users: at share 0.05 the small region lacks valid or test users
    out = tmp_path / "out"
    assert main(["experiment", "--preset", "paper", "--dry-run", "--dataset", str(base), "--out", str(out),
                 "--small-region-share", "0.05"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "each region needs train, valid and test users" in err, err
    assert "platform 'p0'" in err and "small region" in err
    assert not out.exists()
    assert ur.main([str(base), str(tmp_path / "v"), "--share", "0.05"]) == 2
    assert not (tmp_path / "v").exists()


def test_user_in_two_silos_of_one_platform_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    generate(d, users=60, platforms=1, regions=2, seed=2)
    a, b = sorted(list_silos(d))
    line = (d / "silos" / a / "users.csv").read_text().splitlines()[1]
    uid = line.split(",")[0]
    ev = [x for x in (d / "silos" / a / "events.csv").read_text().splitlines()[1:] if x.split(",")[0] == uid]
    with open(d / "silos" / b / "users.csv", "a") as f:
        f.write(line + "\n")
    with open(d / "silos" / b / "events.csv", "a") as f:
        f.write("\n".join(ev) + "\n")
    with pytest.raises(ValueError, match=f"user '{uid}' is in silos {a} and {b}"):
        ur.plan_regions(d, 0.3)


def test_experiment_dry_run_trains_on_the_view(source: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["experiment", "--preset", "smoke", "--dry-run", "--dataset", str(source), "--out", str(out),
                 "--small-region-share", "0.2"]) == 0
    log = capsys.readouterr().out
    view = out / "views" / "small-region-0p2"
    assert f"re-partitioned into {view}" in log and "p0-small:" in log
    assert "fed-p0-small-eps8" in log and "learning curves (federated-dp-eps8, local-only-eps8;" in log
    assert sorted(list_silos(view)) == ["p0-large", "p0-small", "p1-large", "p1-small"]
    assert main(["experiment", "--preset", "smoke", "--dry-run", "--dataset", str(source), "--out",
                 str(tmp_path / "own"), "--keep-regions"]) == 0
    assert "fed-p0-r0-eps8" in capsys.readouterr().out and not (tmp_path / "own" / "views").exists()
