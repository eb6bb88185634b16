"""A cluster's TLS material for Ray's gRPC channels (``edgeray up --tls``, ``edgeray rotate``).

    ca = issue_ca(tls_dir, "edge")                   # tls_dir/ca.crt, ca.key (0600)
    issue_node(tls_dir, ca, "campus-gw", ["127.0.0.2"])  # tls_dir/nodes/campus-gw.crt, .key (0600)

One certificate authority per cluster (ECDSA P-256, self-signed), and one certificate per raylet (its
node name as subject, its addresses as subject alternative names), signed by it and used for both ends of
Ray's mutual TLS (Ray reads ``RAY_USE_TLS``, ``RAY_TLS_SERVER_CERT``, ``RAY_TLS_SERVER_KEY`` and
``RAY_TLS_CA_CERT`` in every process: raylets, their workers, drivers). Drivers (``edgeray env``, job
entrypoints through their raylet, ``serve run``) get a certificate of their own, ``client``.

Private keys are written 0600, atomically. Certificates are valid ``days`` (default 30): ``edgeray rotate``
issues a new CA and new certificates and restarts the cluster's processes with them (Ray reads its
certificates when a process starts), after which the old ones are refused.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeray.atomic import write_atomic

DAYS = 30


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data.decode(), mode=mode)


def issue_ca(tls_dir: Path, cluster: str, *, days: int = DAYS) -> Issued:
    """A new certificate authority for ``cluster`` in ``tls_dir`` (replacing any there)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeray cluster {cluster} CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    issued = Issued(tls_dir / "ca.crt", tls_dir / "ca.key")
    _write(issued.key, _key_pem(key), 0o600)
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return issued


def issue_node(tls_dir: Path, ca: Issued, name: str, addresses: list[str], *, days: int = DAYS) -> Issued:
    """A certificate for ``name`` (a raylet, or ``client`` for drivers) valid for ``addresses`` (IPs or
    DNS names), signed by ``ca``, usable as gRPC server and client (mutual TLS)."""
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for a in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            sans.append(x509.DNSName(a))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    issued = Issued(tls_dir / "nodes" / f"{name}.crt", tls_dir / "nodes" / f"{name}.key")
    _write(issued.key, _key_pem(key), 0o600)
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return issued


def env(ca: Path, issued: Issued) -> dict[str, str]:
    """The environment that makes a Ray process use ``issued`` under ``ca``."""
    return {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(issued.cert),
        "RAY_TLS_SERVER_KEY": str(issued.key),
        "RAY_TLS_CA_CERT": str(ca),
    }
