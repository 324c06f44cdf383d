"""`codi2 test`: check the configured store step by step, as the seed's "test CODI2 with the dev FDB".

Each step is timed and reported on its own line; the first failure stops the run and carries a hint.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codi2.cli import tls
from codi2.config import Settings
from codi2.stores.base import Sink, StoreError

PROBE_TENANT = "codi2-selftest"
CLUSTER_FILE_HINT = "mount the codi2-fdb Secret or set FDB_CLUSTER_FILE"


@dataclass
class Step:
    name: str
    ok: bool
    ms: float
    detail: str
    hint: str | None = None


class StepFailed(Exception):
    def __init__(self, detail: str, hint: str | None = None) -> None:
        super().__init__(detail)
        self.hint = hint


def _timed(name: str, fn: Callable[[], str]) -> Step:
    started = time.perf_counter()
    try:
        detail = fn()
        return Step(name, True, (time.perf_counter() - started) * 1000, detail)
    except StepFailed as exc:
        return Step(name, False, (time.perf_counter() - started) * 1000, str(exc), exc.hint)
    except StoreError as exc:
        return Step(name, False, (time.perf_counter() - started) * 1000, str(exc), _hint(exc))


def _hint(exc: StoreError) -> str | None:
    if exc.code in ("libfdb_c_missing", "libfdb_c_version"):
        from codi2.stores.fdb.client import bindings_series

        return (
            f"install foundationdb-clients {bindings_series()}, the series of the installed Python bindings"
            " (README: client/server version matrix)"
        )
    if exc.code == "fdb_1031":  # transaction_timed_out
        return "is the cluster reachable from here? check the coordinators in the cluster file and the network"
    if exc.code == "no_cluster_file":
        return CLUSTER_FILE_HINT
    if exc.code == "SQLITE_BUSY":
        return "another process holds the database lock"
    return None


def run_checks(settings: Settings, config_path: Path | None) -> Iterator[Step]:
    """Yield each step in order, stopping after the first failure."""
    yield Step("config", True, 0.0, f"{config_path or 'defaults'}: backend {settings.backend}")
    tenant = settings.tenant_id or PROBE_TENANT
    # What a check must write (the cluster file made from `cluster_string`) goes here, not into the state
    # directory: run on a laptop against the pod's config, that would be /workspace/.codi2 on the host.
    with tempfile.TemporaryDirectory(prefix="codi2-test-") as scratch:
        if settings.backend == "fdb":
            state = settings.state.model_copy(update={"dir": Path(scratch)})
            steps = _fdb_steps(settings.model_copy(update={"state": state}), tenant)
        else:
            steps = _sqlite_steps(settings, tenant)
        for name, fn in steps:
            step = _timed(name, fn)
            yield step
            if not step.ok:
                return


def _sqlite_steps(settings: Settings, tenant: str) -> list[tuple[str, Callable[[], str]]]:
    from codi2.stores.sqlite import SqliteSink

    state: dict[str, Sink] = {}

    def open_store() -> str:
        state["sink"] = SqliteSink(settings.sqlite_file)
        return str(settings.sqlite_file)

    def writable() -> str:
        state["sink"].ping()
        return "write lock available"

    def probe() -> str:
        try:
            state["sink"].probe(tenant)
        finally:
            state["sink"].close()
        return f"probe row written, read back and cleared (tenant {tenant})"

    return [("sqlite_open", open_store), ("sqlite_writable", writable), ("probe", probe)]


def _fdb_steps(settings: Settings, tenant: str) -> list[tuple[str, Callable[[], str]]]:
    from codi2.stores.fdb import client as fdb_client
    from codi2.stores.fdb.sink import open_fdb_sink

    state: dict[str, Any] = {}
    api = settings.foundationdb.api_version

    def library() -> str:
        state["fdb"] = fdb_client.load_fdb(api)
        supported = fdb_client.client_library_version(state["fdb"])
        return f"libfdb_c loaded, API version {api} selected (library supports up to {supported})"

    def cluster_file() -> str:
        path = fdb_client.resolve_cluster_file(settings)
        try:
            desc, ident, coordinators = fdb_client.parse_cluster_file(path.read_text())
        except OSError as exc:
            raise StepFailed(f"cluster file {path}: {exc.strerror}", CLUSTER_FILE_HINT) from None
        except ValueError as exc:
            raise StepFailed(
                f"{path}: {exc}", "copy the cluster file from a server (/etc/foundationdb/fdb.cluster)"
            ) from None
        state["sink"] = open_fdb_sink(settings, writer=False)
        return f"{path}: {desc}:{ident}, coordinators {', '.join(coordinators)}"

    def reachable() -> str:
        status = state["sink"].cluster_status()
        client = status.get("client", {}).get("database_status", {})
        cluster = status.get("cluster", {})
        healthy = cluster.get("data", {}).get("state", {}).get("healthy")
        if not client.get("available", False):
            raise StepFailed("database unavailable", "check the cluster's status with fdbcli --exec status")
        return f"available, healthy={healthy}, {len(cluster.get('processes', {}))} processes"

    def probe() -> str:
        state["sink"].probe(tenant)
        return f"probe key written, read back and cleared under tenant {tenant!r}"

    return [
        ("libfdb_c", library),
        ("tls", lambda: _tls(settings)),
        ("cluster_file", cluster_file),
        ("database", reachable),
        ("probe", probe),
    ]


def _tls(settings: Settings) -> str:
    """Before the network starts (the next step), since that is when the client reads the files."""
    fdb = settings.foundationdb
    problems = tls.file_problems(fdb.tls_cert_file, fdb.tls_key_file, fdb.tls_ca_file)
    if problems:
        raise StepFailed("\n".join(problems), "fix or re-issue the files, then update the codi2-fdb Secret")
    return tls.describe(fdb)


def render(steps: list[Step], as_json: bool) -> str:
    if as_json:
        return json.dumps({"ok": all(s.ok for s in steps), "steps": [asdict(s) for s in steps]}, indent=2)
    lines = []
    for s in steps:
        detail = s.detail.replace("\n", "\n      ")  # one line per problem, indented as hints are
        line = f"{'PASS' if s.ok else 'FAIL'}  {s.name:<16} {s.ms:8.1f} ms  {detail}"
        if s.hint:
            line += f"\n      hint: {s.hint}"
        lines.append(line)
    return "\n".join(lines)
