"""Credentials of a Flower deployment, made with ``cryptography``.

* :func:`write_certificates`: a certificate authority and a SuperLink TLS certificate signed
  by it, with subject alternative names (``IP:127.0.0.1``, ``DNS:localhost`` and any host
  given). The SuperLink serves TLS with ``--ssl-ca-certfile ca.crt --ssl-certfile
  server.pem --ssl-keyfile server.key``; SuperNodes and ``flwr`` verify it with ``ca.crt``.
* :func:`write_supernode_keys`: one SuperNode key pair per silo on NIST P-384, the private
  key in OpenSSH format (what ``flower-supernode --auth-supernode-private-key`` loads with
  ``load_ssh_private_key``) and the public key as an OpenSSH line (what ``flwr supernode
  register`` loads with ``load_ssh_public_key``).

Private keys are written 0600; every file is written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_model.io_utils import write_bytes_atomic

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
VALID_DAYS = 365
SUPERNODE_CURVE = ec.SECP384R1  # Flower accepts NIST curves; P-384 is what its docs use


class CredentialError(ValueError):
    """A certificate or key that is missing or cannot be used (one-line message)."""


@dataclass(frozen=True)
class Certificates:
    """Where :func:`write_certificates` put the CA and the SuperLink certificate."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def check(self) -> "Certificates":
        """Raise :class:`CredentialError` unless the three files exist and parse."""
        for path in (self.ca_cert, self.server_cert):
            load_certificate(path)
        load_private_key_pem(self.server_key)
        return self


@dataclass(frozen=True)
class SupernodeKey:
    silo: str
    private: Path
    public: Path


def _write_private(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)
    os.chmod(path, 0o600)


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in ["127.0.0.1", "localhost", *hosts]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedshift"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_certificates(folder: Path, hosts: Sequence[str] = (), days: int = VALID_DAYS) -> Certificates:
    """A CA (``ca.crt``/``ca.key``) and a SuperLink certificate (``server.pem``/``server.key``)
    for 127.0.0.1, localhost and ``hosts`` (IP addresses or DNS names) in ``folder``."""
    folder = Path(folder)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedshift deployment CA")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost")).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    _write_private(folder / CA_KEY, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    _write_private(folder / SERVER_KEY, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    write_bytes_atomic(folder / CA_CERT, ca.public_bytes(pem))
    write_bytes_atomic(folder / SERVER_CERT, server.public_bytes(pem))
    return Certificates(folder)


def write_supernode_keys(folder: Path, silos: Sequence[str]) -> list[SupernodeKey]:
    """``<silo>.key`` (OpenSSH private, 0600) and ``<silo>.pub`` (OpenSSH public) per silo."""
    keys = []
    for silo in silos:
        if not silo or "/" in silo or silo.startswith("."):
            raise CredentialError(f"--silos: {silo!r} is not a silo name")
        key = ec.generate_private_key(SUPERNODE_CURVE())
        private = Path(folder) / f"{silo}.key"
        public = Path(folder) / f"{silo}.pub"
        _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
        write_bytes_atomic(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                 serialization.PublicFormat.OpenSSH) + b"\n")
        keys.append(SupernodeKey(silo, private, public))
    return keys


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise CredentialError(f"{path}: certificate not found") from None
    except (OSError, ValueError) as exc:
        raise CredentialError(f"{path}: not a PEM certificate ({exc})") from None


def load_private_key_pem(path: Path) -> object:
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise CredentialError(f"{path}: private key not found") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialError(f"{path}: not an unencrypted PEM private key ({exc})") from None


def check_supernode_key(private: Path, public: Path | None = None) -> None:
    """Raise :class:`CredentialError` unless ``private`` is an OpenSSH EC private key Flower
    can load (and, when given, ``public`` is its OpenSSH public key)."""
    try:
        key = serialization.load_ssh_private_key(Path(private).read_bytes(), password=None)
    except FileNotFoundError:
        raise CredentialError(f"{private}: SuperNode private key not found") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialError(f"{private}: not an OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{private}: SuperNode keys must be elliptic-curve (NIST P-384), not {type(key).__name__}")
    if public is None:
        return
    try:
        pub = serialization.load_ssh_public_key(Path(public).read_bytes())
    except FileNotFoundError:
        raise CredentialError(f"{public}: SuperNode public key not found") from None
    except (OSError, ValueError) as exc:
        raise CredentialError(f"{public}: not an OpenSSH public key ({exc})") from None
    if pub != key.public_key():
        raise CredentialError(f"{public}: does not match the private key {private}")
