"""Real X.509 material for the TLS tests, made with `cryptography`: a CA and certificates it signs. Test-only."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> bytes:
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def issue(
    directory: Path,
    *,
    not_before: dt.datetime = NOW - DAY,
    not_after: dt.datetime = NOW + 365 * DAY,
    passphrase: bytes | None = None,
) -> TlsFiles:
    """A CA, and a client certificate and key for codi2 that the CA signed, written under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, client_key = _key(), _key()
    files = TlsFiles(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    files.ca.write_bytes(_certificate("codi2 test CA", ca_key, None, NOW - DAY, NOW + 3650 * DAY))
    files.cert.write_bytes(_certificate("codi2", client_key, ("codi2 test CA", ca_key), not_before, not_after))
    files.key.write_bytes(_pem_key(client_key, passphrase))
    return files


def other_key(path: Path) -> Path:
    """A valid key that belongs to no certificate here."""
    path.write_bytes(_pem_key(_key()))
    return path
