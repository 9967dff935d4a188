"""`fedshift deploy local` without processes: secure aggregation is on by default (off only
when asked), and preparing the silos' disks gathers each silo's ledger public key into
OUT/silo-keys, as `fedshift simulate` does, for `fedshift audit OUT --silo-keys OUT/silo-keys`."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedshift.deploy_cmd import local_plan
from fedshift.deployment import LocalDeployment
from shared_model.dataset import list_silos
from shared_model.privacy.ledger_signatures import PUB_NAME


def _args(tmp_path: Path, dataset: Path, *sets: str) -> argparse.Namespace:
    return argparse.Namespace(preset="quick", dataset=str(dataset), base_model=None, rounds=1, set=list(sets),
                              silos=2, out=str(tmp_path / "out"))


def test_secure_aggregation_is_on_unless_turned_off(tmp_path: Path, small_dataset: Path) -> None:
    assert local_plan(_args(tmp_path, small_dataset))[0].secure_aggregation is True
    off = local_plan(_args(tmp_path, small_dataset, "secure-aggregation=false"))[0]
    assert off.secure_aggregation is False


def test_prepare_gathers_the_silos_ledger_public_keys(tmp_path: Path, small_dataset: Path) -> None:
    silos = list_silos(small_dataset)[:2]
    dep = LocalDeployment(tmp_path / "out", small_dataset, silos)
    dep.prepare()
    for silo in silos:
        gathered = tmp_path / "out" / "silo-keys" / f"{silo}.pub"
        assert gathered.read_bytes() == (dep.disk(silo).state / silo / PUB_NAME).read_bytes()
    assert sorted(p.stem for p in (tmp_path / "out" / "silo-keys").iterdir()) == sorted(silos)
