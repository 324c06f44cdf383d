"""The FoundationDB client's bootstrap: the bindings, their API version, TLS, the cluster file.

Only pure-Python parts of the bindings are used at import time; `libfdb_c` is loaded by `load_fdb` when a
store is opened, so the package imports where the C library is not installed. Every failure becomes a
one-line StoreError whose code names it (`codi2 test` turns the codes into hints).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import fdb

from codi2.config import FoundationDBSettings, Settings
from codi2.stores.base import StoreError

CLUSTER_LINE = re.compile(r"^(?P<desc>[A-Za-z0-9_]+):(?P<id>[A-Za-z0-9]+)@(?P<coords>\S+)$")


def store_error(exc: Any) -> StoreError:
    """An `fdb.FDBError` as a StoreError: the client library's description (bytes in the bindings) and a code
    that is the FDB error number, so no table of names can drift from the library."""
    return StoreError(f"fdb: {exc.description.decode(errors='replace')} ({exc.code})", code=f"fdb_{exc.code}")


def bindings_series() -> str:
    """The client series the installed bindings need (e.g. "7.3"): libfdb_c must support their API version."""
    latest: int = fdb.LATEST_API_VERSION
    return f"{latest // 100}.{latest % 100 // 10}"


def load_fdb(api_version: int) -> ModuleType:
    """Select the API version, loading libfdb_c; every failure becomes one line."""
    if fdb.is_api_version_selected():
        selected = fdb.get_api_version()
        if selected != api_version:
            raise StoreError(
                f"cannot use FoundationDB API version {api_version}: this process already selected {selected}",
                code="api_version_conflict",
            )
        return cast(ModuleType, fdb)  # the bindings ship no types
    try:
        fdb.api_version(api_version)
    except Exception as exc:  # the bindings raise bare Exception and RuntimeError here
        text = str(exc)
        if "Unable to locate" in text:
            raise StoreError(
                f"libfdb_c, the FoundationDB client library for api_version {api_version}, is not installed",
                code="libfdb_c_missing",
            ) from None
        raise StoreError(f"FoundationDB client library: {text}", code="libfdb_c_version") from None
    return cast(ModuleType, fdb)


def client_library_version(fdb_module: Any) -> str:
    """The max API version the loaded libfdb_c supports (its release series)."""
    return str(fdb_module.impl._capi.fdb_get_max_api_version())


def set_network_options(options: Any, settings: FoundationDBSettings) -> None:
    """Hand the TLS settings to the bindings' network options (`fdb.options`): certificate, key, CA, peer
    verification, each only when configured. The client applies them when its network is set up, so they
    are set after the API version is selected and before `fdb.open`, which sets the network up."""
    if settings.tls_cert_file is not None:
        options.set_tls_cert_path(str(settings.tls_cert_file))
    if settings.tls_key_file is not None:
        options.set_tls_key_path(str(settings.tls_key_file))
    if settings.tls_ca_file is not None:
        options.set_tls_ca_path(str(settings.tls_ca_file))
    if settings.tls_verify_peers is not None:
        options.set_tls_verify_peers(settings.tls_verify_peers.encode())


def parse_cluster_file(text: str) -> tuple[str, str, list[str]]:
    """`description:id@host:port[,host:port...]`, comments (#) and blank lines ignored."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1 or not (m := CLUSTER_LINE.match(lines[0])):
        raise ValueError("expected one line description:id@host:port[,host:port...]")
    coordinators = m["coords"].split(",")
    if not all(re.fullmatch(r"[\w.\-\[\]:]+:\d+(:tls)?", c) for c in coordinators):
        raise ValueError(f"bad coordinator address in {m['coords']!r}")
    return m["desc"], m["id"], coordinators


def _cluster_id(text: str) -> str | None:
    try:
        desc, ident, _ = parse_cluster_file(text)
    except ValueError:
        return None
    return f"{desc}:{ident}"


def resolve_cluster_file(settings: Settings) -> Path:
    """FDB_CLUSTER_FILE wins, then an existing `cluster_file`, then `cluster_string` written privately."""
    env = os.environ.get("FDB_CLUSTER_FILE")
    if env:
        if not os.path.exists(env):  # said here, as `codi2 test` says it: the client's own error names no file
            raise StoreError(
                f"cluster file {env} (FDB_CLUSTER_FILE): No such file or directory", code="no_cluster_file"
            )
        return Path(env)
    fdb_settings = settings.foundationdb
    if fdb_settings.cluster_file is not None and fdb_settings.cluster_file.exists():
        return fdb_settings.cluster_file
    if fdb_settings.cluster_string:
        return _write_cluster_file(settings.state_dir / "fdb.cluster", fdb_settings.cluster_string.strip())
    where = fdb_settings.cluster_file or "no [foundationdb] cluster_file"
    raise StoreError(f"no FoundationDB cluster file ({where}) and no cluster_string", code="no_cluster_file")


def _write_cluster_file(path: Path, cluster_string: str) -> Path:
    """Write the file unless it already names the same cluster (description:id): the client rewrites it
    itself when the coordinators change, and a restart must not undo that."""
    try:
        current = _cluster_id(path.read_text())
    except FileNotFoundError:
        current = None
    if current is not None and current == _cluster_id(cluster_string):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_name(path.name + ".tmp")
    fd = os.open(partial_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cluster_string + "\n")
    os.replace(partial_path, path)  # the client may read the file at any time: never a half-written one
    return path
