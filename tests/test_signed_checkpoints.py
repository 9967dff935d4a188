"""Signed checkpoints: `fedshift verify` accepts an intact checkpoint and names the file of a
changed byte, a missing file and an added file; bad keys and folders exit 2 in one line;
`evaluate` and `recommend` refuse an unverified checkpoint when given --public-key."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from fedshift.cli import main
from shared_model.adapters import save_checkpoint
from shared_model.checkpoint_signature import MANIFEST, SERVER_KEY, SERVER_PUB, run_signing_key
from shared_model.config import RunConfig
from shared_model.model import build_model
from shared_model.signing import load_or_create_private_key, write_public_key


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> tuple[Path, Path]:
    """(a signed round checkpoint of a real tiny model, the run's public key)."""
    run = tmp_path_factory.mktemp("run")
    key = run_signing_key(run)
    cfg = RunConfig(base_model=str(tiny_bert))
    folder = save_checkpoint(build_model(cfg, 3), run / "checkpoints" / "round-001",
                             {"round": 1, "config": cfg.to_run_config(), "categories": ["a", "b", "c"]}, key)
    return folder, run / SERVER_PUB


@pytest.fixture()
def copy(signed: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    folder, pub = signed
    return Path(shutil.copytree(folder, tmp_path / "round-001")), pub


def _verify(folder: Path, pub: Path) -> int:
    return main(["verify", str(folder), "--public-key", str(pub)])


def test_private_key_is_0600_and_public_key_is_beside_the_run(signed: tuple[Path, Path]) -> None:
    folder, pub = signed
    run = folder.parent.parent
    assert stat.S_IMODE(os.stat(run / SERVER_KEY).st_mode) == 0o600
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert run_signing_key(run).public_key() == load_or_create_private_key(run / SERVER_KEY).public_key()  # reused


def test_an_intact_checkpoint_verifies(copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(*copy) == 0
    assert "intact" in capsys.readouterr().out


def test_a_changed_byte_is_named(copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, pub = copy
    target = folder / "heads.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    assert _verify(folder, pub) == 1
    err = capsys.readouterr().err
    assert f"{target}: changed" in err and "fedshift.json" not in err  # only the changed file is named


def test_a_missing_file_is_named(copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, pub = copy
    (folder / "heads.safetensors").unlink()
    assert _verify(folder, pub) == 1
    assert f"{folder / 'heads.safetensors'}: missing" in capsys.readouterr().err


def test_an_added_file_is_named(copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, pub = copy
    (folder / "extra.safetensors").write_bytes(b"x")
    assert _verify(folder, pub) == 1
    assert f"{folder / 'extra.safetensors'}: added" in capsys.readouterr().err


def test_the_item_index_cache_is_not_an_added_file(copy: tuple[Path, Path]) -> None:
    folder, pub = copy
    (folder / "item-index.pt").write_bytes(b"cache")
    assert _verify(folder, pub) == 0


def test_a_re_written_manifest_fails_the_signature(copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, pub = copy
    (folder / MANIFEST).write_text((folder / MANIFEST).read_text().replace('"files"', '"files" ', 1))
    assert _verify(folder, pub) == 1
    assert f"{folder / MANIFEST}: signature does not verify" in capsys.readouterr().err


def test_another_runs_key_does_not_verify(copy: tuple[Path, Path], tmp_path: Path) -> None:
    other = write_public_key(load_or_create_private_key(tmp_path / "other.key"), tmp_path / "other.pub")
    assert _verify(copy[0], other) == 1


def test_bad_key_or_folder_exits_2_in_one_line(copy: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder, pub = copy
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    for args in ([str(folder), "--public-key", str(junk)], [str(folder), "--public-key", str(tmp_path / "none.pub")],
                 [str(tmp_path / "nowhere"), "--public-key", str(pub)]):
        assert main(["verify", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("fedshift verify: ")


def test_evaluate_and_recommend_refuse_an_unverified_checkpoint(copy: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder, pub = copy
    (folder / "heads.safetensors").unlink()
    assert main(["evaluate", "--checkpoint", str(folder), "--public-key", str(pub)]) == 1
    assert "heads.safetensors: missing" in capsys.readouterr().err
    assert main(["recommend", "--checkpoint", str(folder), "--public-key", str(pub),
                 "--platform", "arts", "--history", "a"]) == 1
    assert "heads.safetensors: missing" in capsys.readouterr().err
