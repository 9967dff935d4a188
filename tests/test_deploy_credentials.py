"""Deployment credentials and `fedshift deploy` bad input (no Flower process is started)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshift.cli import main
from fedshift.deploy_credentials import (CredentialError, check_supernode_key, write_certificates,
                                         write_supernode_keys)
from shared_model.dataset import FEDERATION_MISMATCH, federation_mismatch


def test_certificates_chain_to_the_ca_with_loopback_names(tmp_path: Path) -> None:
    certs = write_certificates(tmp_path / "certs", hosts=["10.0.0.7", "link.example.org"])
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer is wrong
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("10.0.0.7")}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (certs.server_key, tmp_path / "certs" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    certs.check()


def test_supernode_keys_are_p384_openssh_pairs(tmp_path: Path) -> None:
    keys = write_supernode_keys(tmp_path, ["a", "b"])
    for key in keys:
        private = serialization.load_ssh_private_key(key.private.read_bytes(), None)
        public = serialization.load_ssh_public_key(key.public.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key() == public
        assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
        check_supernode_key(key.private, key.public)
    with pytest.raises(CredentialError, match="does not match"):
        check_supernode_key(keys[0].private, keys[1].public)


def test_cli_certs_and_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "certs", str(tmp_path / "c"), "--san", "192.168.1.5"]) == 0
    assert main(["deploy", "keys", str(tmp_path / "k"), "--silos", "north,south"]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["north.key", "north.pub", "south.key", "south.pub"]
    assert main(["deploy", "keys", str(tmp_path / "k"), "--silos", "../x"]) == 2
    assert "not a silo name" in capsys.readouterr().err


def _local(tmp_path: Path, dataset: Path, *extra: str) -> list[str]:
    return ["deploy", "local", "--silos", "2", "--out", str(tmp_path / "out"), "--dataset", str(dataset), *extra]


def _one_line_refusal(capsys: pytest.CaptureFixture[str], needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedshift deploy local: ") and needle in err, err
    assert "Traceback" not in err


def test_deploy_local_bad_input_exits_2_before_starting(tmp_path: Path, small_dataset: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # a missing certificate
    assert main(_local(tmp_path, small_dataset, "--certs", str(tmp_path / "nocerts"))) == 2
    _one_line_refusal(capsys, "certificate not found")
    # a wrong key: the public half is another silo's
    keys = write_supernode_keys(tmp_path / "keys", ["p0-r0", "p1-r0"])
    (tmp_path / "keys" / "p0-r0.pub").write_bytes(keys[1].public.read_bytes())
    assert main(_local(tmp_path, small_dataset, "--keys", str(tmp_path / "keys"))) == 2
    _one_line_refusal(capsys, "does not match")
    # an unreadable policy on a silo's disk
    policy = tmp_path / "out" / "silos" / "p0-r0" / "policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text("max-epsilon-per-run = [\n")
    assert main(_local(tmp_path, small_dataset)) == 2
    _one_line_refusal(capsys, "policy.toml")
    # a silo folder that is not a silo
    fake = tmp_path / "fake"
    (fake / "silos" / "empty").mkdir(parents=True)
    for name in ("items.csv", "dataset.json"):
        if (small_dataset / name).exists():
            (fake / name).write_bytes((small_dataset / name).read_bytes())
    assert main(["deploy", "local", "--silos", "1", "--out", str(tmp_path / "o2"), "--dataset", str(fake)]) == 2
    _one_line_refusal(capsys, "not a silo folder")
    # more silos than the dataset has, an unknown --set key
    assert main(["deploy", "local", "--silos", "9", "--out", str(tmp_path / "o3"), "--dataset", str(small_dataset)]) == 2
    _one_line_refusal(capsys, "has 3 silos")
    assert main(_local(tmp_path, small_dataset, "--set", "no-such-key=1")) == 2
    _one_line_refusal(capsys, "no-such-key")
    assert not (tmp_path / "out" / "superlink.log").exists()


def test_a_federation_smaller_than_the_dataset_is_refused(tmp_path: Path) -> None:
    silos = ["a", "b", "c", "d"]
    assert federation_mismatch(None, tmp_path, silos) is None  # a deployed node names its silo-dir
    assert federation_mismatch(4, tmp_path, silos) is None
    problem = federation_mismatch(2, tmp_path, silos)
    assert problem is not None and problem.startswith(FEDERATION_MISMATCH)
    assert "has 4 silos" in problem and "num-supernodes=4" in problem
