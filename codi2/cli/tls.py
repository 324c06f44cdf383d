"""FoundationDB TLS files checked before they are used: by `codi2 test`, and by the provisioner for the
files it is about to put into a Secret. The settings reach the client in `codi2.stores.fdb.client`; this
module imports no FoundationDB code, and loads `cryptography` only for the checks, which the daemon never runs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

from codi2.config import FoundationDBSettings

if TYPE_CHECKING:
    from cryptography import x509


def file_problems(cert: Path | None, key: Path | None, ca: Path | None, now: dt.datetime | None = None) -> list[str]:
    """One line per problem: a file unreadable or not PEM, a certificate expired or not yet valid, a key
    encrypted or not the certificate's."""
    from cryptography.hazmat.primitives import serialization

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = now or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    chain = _certificates("certificate", cert, now, problems) if cert is not None else []
    if ca is not None:
        _certificates("CA file", ca, now, problems)
    if key is None or (data := _read("key", key, problems)) is None:
        return problems
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        problems.append(f"key {key}: encrypted; codi2 needs the key without a passphrase")
    except ValueError:
        problems.append(f"key {key}: not a PEM private key")
    else:
        if chain and private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
            problems.append(f"key {key}: does not belong to certificate {cert} ({_name(chain[0])})")
    return problems


def describe(settings: FoundationDBSettings) -> str:
    """What `codi2 test` says when `file_problems` found none."""
    files = {"certificate": settings.tls_cert_file, "key": settings.tls_key_file, "CA file": settings.tls_ca_file}
    named = ", ".join(f"{what} {path}" for what, path in files.items() if path is not None)
    if not named:
        return "no TLS files: connections to the cluster are neither encrypted nor authenticated (docs/security.md)"
    matched = ", the key is the certificate's" if settings.tls_key_file is not None else ""
    return f"{named}: readable, valid now{matched}"


def _read(what: str, path: Path, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append(f"{what} {path}: {exc.strerror}")
        return None


def _certificates(what: str, path: Path, now: dt.datetime, problems: list[str]) -> list[x509.Certificate]:
    from cryptography import x509

    data = _read(what, path, problems)
    if data is None:
        return []
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        problems.append(f"{what} {path}: no PEM certificate in it")
        return []
    for cert in chain:
        if cert.not_valid_after_utc < now:
            problems.append(f"{what} {path}: {_name(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        elif cert.not_valid_before_utc > now:
            problems.append(
                f"{what} {path}: {_name(cert)} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
    return chain


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"
