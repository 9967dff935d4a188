"""Bad files tried as a new user would: each is a one-line error with exit 2, or a rebuild of
the cache that says so — never a traceback, never used silently."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from fedshift.cli import main
from fedshift.data_cmd import main as data_main
from shared_model.adapters import save_checkpoint
from shared_model.checkpoint_index import INDEX_FILE
from shared_model.config import RunConfig
from shared_model.dataset import load_catalogue, validate_dataset
from shared_model.item_index import catalogue_hash
from shared_model.model import build_model

SILO = "silos/p0-r0"


@pytest.fixture
def ds(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(base, d)
    return d


def _validate(d: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert data_main(["validate", str(d)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out and not any("Traceback" in line for line in out)
    return out


def test_header_only_users_csv_is_an_error(ds: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ds / SILO / "users.csv").write_text("user_id,split\n")
    out = _validate(ds, capsys)
    assert out[0].startswith(f"{SILO}/users.csv:1: user_id: no users")


def test_a_hidden_silo_folder_is_an_error_not_skipped(ds: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(ds / SILO, ds / "silos" / ".p0-r9")
    out = _validate(ds, capsys)
    assert out[0].startswith("silos/.p0-r9:0: path: a silo folder name must not start with '.'")


@pytest.mark.parametrize("what", ["items.csv", f"{SILO}/events.csv", SILO])
def test_symlinks_out_of_the_dataset_are_refused(what: str, ds: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / Path(what).name
    shutil.move(str(ds / what), target)
    (ds / what).symlink_to(target, target_is_directory=target.is_dir())
    out = _validate(ds, capsys)
    assert any(f"a symlink to {target}" in line and "outside" in line for line in out), out


@pytest.mark.parametrize(("name", "command"), [("simulate", ["simulate"]),
                                             ("deploy local", ["deploy", "local", "--silos", "2"]),
                                             ("experiment", ["experiment", "--preset", "smoke"])])
def test_a_bad_silo_file_stops_the_run_before_it_starts(name: str, command: list[str], ds: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    events = ds / SILO / "events.csv"
    lines = events.read_text().splitlines(keepends=True)
    lines[2] = lines[2].rsplit(",", 1)[0] + "\n"  # line 3 loses its event_type
    events.write_text("".join(lines))
    out = tmp_path / "run"
    assert main([*command, "--dataset", str(ds), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith(f"fedshift {name}: ") for line in err), err
    assert f"fedshift {name}: {SILO}/events.csv:3: row: expected 4 fields, found 3" in err, err
    assert not out.exists()  # no output folder, no silo state, no Flower process


def test_a_symlink_inside_the_dataset_is_fine(ds: Path) -> None:
    shutil.move(str(ds / "items.csv"), ds / "items-real.csv")
    (ds / "items.csv").symlink_to(ds / "items-real.csv")
    assert validate_dataset(ds) == []


def test_a_50_mb_csv_line_is_a_one_line_error(ds: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(ds / "items.csv", "a", encoding="utf-8") as f:
        f.write("huge,p0," + "x" * 50_000_000 + ",,\n")
    out = _validate(ds, capsys)
    assert len(out) == 1 and out[0].startswith("items.csv:") and "field larger than field limit" in out[0]


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> Path:
    cfg = RunConfig(dataset=str(small_dataset), base_model=str(tiny_bert), max_eval_users=0, eval_batch_size=32)
    catalogue = load_catalogue(small_dataset)
    categories = catalogue.interest_vocab()
    model = build_model(cfg, len(categories), seed=3)
    meta = {"round": 1, "base-model": str(tiny_bert), "categories": categories, "config": cfg.to_run_config(),
            "catalogue-sha256": catalogue_hash(catalogue)}
    folder = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "round-001", meta)
    assert main(["recommend", "--checkpoint", str(folder), "--platform", "p0", "--history", "a"]) == 0  # builds the index
    return folder


@pytest.fixture
def ckpt(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def _recommend(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["recommend", "--checkpoint", str(ckpt), "--platform", "p0", "--history", "a", "--json"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_truncated_arrays_are_a_one_line_error(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = ckpt / "heads.safetensors"  # the sequence model's arrays (the text tower: also adapter_model.safetensors)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc, _, err = _recommend(ckpt, capsys)
    assert rc == 2 and "cannot load the checkpoint's arrays" in err and "Traceback" not in err
    assert main(["evaluate", "--checkpoint", str(ckpt), "--no-baselines"]) == 2


def _tamper(ckpt: Path, how: str) -> None:
    path = ckpt / INDEX_FILE
    if how == "bytes":
        raw = bytearray(path.read_bytes())
        i = raw.rfind(b"data/0") + 200  # inside the embedding tensor's bytes
        raw[i : i + 64] = bytes(64)
        path.write_bytes(bytes(raw))
        return
    saved = torch.load(path, weights_only=True)
    if how == "nan":
        saved["emb"][3] = float("nan")
        saved.pop("sha256")  # an index written before the hash was stored: the content check still holds
    elif how == "shape":
        saved["emb"] = saved["emb"][:, :5].contiguous()
    torch.save(saved, path)


@pytest.mark.parametrize("how", ["nan", "shape", "bytes"])
def test_a_bad_item_index_is_rebuilt_and_says_so(how: str, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tamper(ckpt, how)
    rc, out, err = _recommend(ckpt, capsys)
    assert rc == 0, err
    assert f"{ckpt / INDEX_FILE}: " in err and "rebuilding it" in err, err
    res = json.loads(out)
    assert res["index"]["source"] == "rebuilt" and len(res["items"]) > 0
    saved = torch.load(ckpt / INDEX_FILE, weights_only=True)
    assert torch.isfinite(saved["emb"]).all()


def test_evaluate_on_another_catalogue_is_refused_and_keeps_the_index(ckpt: Path, tmp_path: Path,
                                                                      small_dataset: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    other = Path(shutil.copytree(small_dataset, tmp_path / "other"))
    rows = list(csv.DictReader((other / "items.csv").open(encoding="utf-8")))
    rows[0]["title"] += " (renamed)"
    with (other / "items.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    before = (ckpt / INDEX_FILE).read_bytes()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--dataset", str(other), "--no-baselines"]) == 2
    err = capsys.readouterr().err
    assert "is not the one the checkpoint was trained on" in err and len(err.strip().splitlines()) == 1
    assert (ckpt / INDEX_FILE).read_bytes() == before


def test_an_experiment_view_opens_no_file_outside_itself(base: Path, tmp_path: Path) -> None:
    from simulations.experiment.run import dataset_view

    view = dataset_view(base, ["p0-r0"], tmp_path / "view")
    assert validate_dataset(view) == []
    files = [p for p in view.rglob("*") if p.is_file()]
    assert files and not any(p.is_symlink() for p in view.rglob("*"))
    assert (view / "items.csv").read_bytes() == (base / "items.csv").read_bytes()
