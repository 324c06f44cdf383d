"""FoundationDB sink: tenant-scoped, batched, idempotent transactions. Layout: docs/fdb-layout.md.

Written against the official `fdb` bindings exactly as a server runs them. Only `fdb.tuple` is used at
import time (pure Python); `libfdb_c` is loaded by `load_fdb` when a store is opened, so the package
imports and its logic is testable where the C library cannot be installed.

Exactly once: every part of a batch is one transaction that first reads its marker key and the id keys
of its events, and writes nothing already present. A retry after `commit_unknown_result` (1021), a
replayed batch or an event re-sent in another batch therefore lands once. Versionstamped keys give one
commit order across every pod of a tenant.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fdb.tuple as fdbtuple

from codi2.config import Settings
from codi2.events import Batch, Event, EventQuery
from codi2.sinks import Cursor, StoreError

VALUE_FORMAT = 1
PATH_KEY_MAX = 2048  # longer paths are hashed in the by-path key; the event value keeps them whole
PAGE_ROWS = 1000
PRUNE_EVERY = 100

# The codes this sink names in /status and metrics (FoundationDB's error_definitions.h).
FDB_ERRORS = {
    1007: "transaction_too_old",
    1009: "future_version",
    1020: "not_committed",
    1021: "commit_unknown_result",
    1025: "transaction_cancelled",
    1031: "transaction_timed_out",
    1037: "process_behind",
    1038: "database_locked",
    1039: "cluster_version_changed",
    1042: "proxy_memory_limit_exceeded",
    1051: "batch_transaction_throttled",
    1078: "tag_throttled",
    1213: "grv_proxy_memory_limit_exceeded",
    2101: "transaction_too_large",
    2102: "key_too_large",
    2103: "value_too_large",
    2203: "api_version_not_supported",
}
TOO_LARGE = frozenset({2101, 2102, 2103})


def error_name(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return FDB_ERRORS.get(code, getattr(exc, "description", None) or "fdb_error") if code else type(exc).__name__


def store_error(exc: Exception) -> StoreError:
    name = error_name(exc)
    code = getattr(exc, "code", None)
    return StoreError(f"fdb: {name} ({code})" if code else f"fdb: {exc}", code=name)


def load_fdb(api_version: int) -> Any:
    """Select the API version, loading libfdb_c; every failure becomes one line with a hint."""
    import fdb

    if fdb.is_api_version_selected():
        return fdb
    try:
        fdb.api_version(api_version)
    except Exception as exc:
        text = str(exc)
        if "Unable to locate" in text:
            raise StoreError(
                f"libfdb_c, the FoundationDB client library for api_version {api_version}, is not installed",
                code="libfdb_c_missing",
            ) from None
        raise StoreError(f"FoundationDB client library: {text}", code="libfdb_c_version") from None
    return fdb


def client_library_version(fdb_module: Any) -> str:
    """The max API version the loaded libfdb_c supports (its release series)."""
    return str(fdb_module.impl._capi.fdb_get_max_api_version())


def resolve_cluster_file(settings: Settings) -> Path:
    """FDB_CLUSTER_FILE wins, then an existing `cluster_file`, then `cluster_string` written privately."""
    env = os.environ.get("FDB_CLUSTER_FILE")
    if env:
        return Path(env)
    fdb_settings = settings.foundationdb
    if fdb_settings.cluster_file is not None and fdb_settings.cluster_file.exists():
        return fdb_settings.cluster_file
    if fdb_settings.cluster_string:
        path = settings.state_dir / "fdb.cluster"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(fdb_settings.cluster_string.strip() + "\n")
        return path
    where = fdb_settings.cluster_file or "no [foundationdb] cluster_file"
    raise StoreError(f"no FoundationDB cluster file ({where}) and no cluster_string", code="no_cluster_file")


def open_fdb_sink(settings: Settings, *, writer: bool) -> FdbSink:
    """The daemon's sink (`writer`: scoped to its own tenant) or a reader's, on the configured cluster."""
    fdb_settings = settings.foundationdb
    fdb = load_fdb(fdb_settings.api_version)
    cluster_file = resolve_cluster_file(settings)
    try:
        db = fdb.open(str(cluster_file))
    except fdb.FDBError as exc:
        raise store_error(exc) from None
    return FdbSink(
        db,
        fdb.FDBError,
        tenant_id=settings.tenant_id if writer else None,
        root=fdb_settings.root_prefix,
        timeout_ms=fdb_settings.transaction_timeout_ms,
        retry_limit=fdb_settings.retry_limit,
        batch_bytes=fdb_settings.batch_bytes,
        marker_retention_s=fdb_settings.marker_retention_hours * 3600,
    )


def encode_event(event: Event) -> bytes:
    """The stored value: a tuple, tenant left out (it is in the key), paths as their raw bytes."""
    return fdbtuple.pack(
        (
            VALUE_FORMAT,
            event.id,
            event.seq,
            event.ts,
            event.user_id,
            event.session_id,
            event.pod,
            event.action,
            os.fsencode(event.path),
            None if event.dest_path is None else os.fsencode(event.dest_path),
            event.root,
            event.type,
            event.size,
            event.mode,
            event.mtime,
            event.sha256,
            event.origin,
        )
    )


def decode_event(tenant_id: str, value: bytes) -> Event:
    fmt, eid, seq, ts, user, session, pod, action, path, dest, root, typ, size, mode, mtime, sha, origin = (
        fdbtuple.unpack(value)
    )
    if fmt != VALUE_FORMAT:
        raise StoreError(f"fdb: unknown event value format {fmt}", code="bad_value")
    return Event(
        id=eid,
        seq=seq,
        ts=ts,
        tenant_id=tenant_id,
        user_id=user,
        session_id=session,
        pod=pod,
        action=action,
        path=os.fsdecode(path),
        dest_path=None if dest is None else os.fsdecode(dest),
        root=root,
        type=typ,
        size=size,
        mode=mode,
        mtime=mtime,
        sha256=sha,
        origin=origin,
    )


@dataclass(frozen=True, slots=True)
class _Row:
    event: Event
    value: bytes
    path_key: bytes | str | tuple[str, str]
    id_key: bytes
    size: int


class _TooLarge(Exception):
    pass


class FdbSink:
    """`db` is an `fdb.Database` (or the test double); `error_type` is `fdb.FDBError` (or the double's)."""

    name = "fdb"

    def __init__(
        self,
        db: Any,
        error_type: type[Exception],
        *,
        tenant_id: str | None,
        root: Sequence[str] = ("codi2",),
        timeout_ms: int = 5000,
        retry_limit: int = 10,
        batch_bytes: int = 1_000_000,
        marker_retention_s: float = 7 * 86400,
    ) -> None:
        self._db = db
        self._error = error_type
        self._tenant = tenant_id
        self._prefix = fdbtuple.pack(tuple(root))
        self._timeout_ms = timeout_ms
        self._retry_limit = retry_limit
        self._batch_bytes = batch_bytes
        self._retention_s = marker_retention_s
        self._parts_written = 0

    # Keys ----------------------------------------------------------------------------------------

    def key(self, *parts: Any) -> bytes:
        return self._prefix + fdbtuple.pack(parts)

    def _vs_key(self, *parts: Any) -> bytes:
        return fdbtuple.pack_with_versionstamp(parts, prefix=self._prefix)

    def _tenant_range(self, tenant_id: str, namespace: str) -> tuple[bytes, bytes]:
        base = self.key(tenant_id, namespace)
        return base + b"\x00", base + b"\xff"

    def _transaction(self) -> Any:
        tr = self._db.create_transaction()
        tr.options.set_timeout(self._timeout_ms)
        tr.options.set_retry_limit(self._retry_limit)
        return tr

    # Writing -------------------------------------------------------------------------------------

    def write_batch(self, batch: Batch) -> None:
        if self._tenant is not None and any(e.tenant_id != self._tenant for e in batch.events):
            raise ValueError("fdb: refusing to write events of another tenant")  # FDB is no security boundary
        by_tenant: dict[str, list[_Row]] = {}
        for event in batch.events:
            by_tenant.setdefault(event.tenant_id, []).append(self._row(event.tenant_id, event))
        for tenant, rows in by_tenant.items():
            parts: list[list[_Row]] = [[]]
            size = 0
            for row in rows:
                if parts[-1] and size + row.size > self._batch_bytes:
                    parts.append([])
                    size = 0
                parts[-1].append(row)
                size += row.size
            suffix = "" if len(by_tenant) == 1 else f".{len(tenant)}:{tenant}"
            for index, part in enumerate(parts):
                self._commit_split(tenant, f"{batch.batch_id}.{index}{suffix}", part)

    def _row(self, tenant: str, event: Event) -> _Row:
        value = encode_event(event)
        raw_path = os.fsencode(event.path)
        path_key: bytes | tuple[str, str] = raw_path
        if len(raw_path) > PATH_KEY_MAX:  # keep the key under FDB's 10,000 bytes; the value has the path
            path_key = ("sha256", hashlib.sha256(raw_path).hexdigest())
        id_key = self.key(tenant, "event_ids", event.id)
        vs = fdbtuple.Versionstamp()
        size = (
            len(self._vs_key(tenant, "audit", vs, 0xFFFF))
            + len(value)
            + len(self._vs_key(tenant, "audit_by_path", path_key, vs, 0xFFFF))
            + len(event.id)
            + len(id_key)
            + 16
        )
        return _Row(event, value, path_key, id_key, size)

    def _commit_split(self, tenant: str, part_id: str, rows: list[_Row]) -> None:
        """Commit rows as one transaction; if FDB says it is too large, in two halves (recursively)."""
        try:
            self._commit(tenant, part_id, rows)
        except _TooLarge:
            if len(rows) == 1:
                raise StoreError("fdb: a single event exceeds FoundationDB's limits", code="too_large") from None
            middle = len(rows) // 2
            self._commit_split(tenant, part_id + "a", rows[:middle])
            self._commit_split(tenant, part_id + "b", rows[middle:])

    def _commit(self, tenant: str, part_id: str, rows: list[_Row]) -> None:
        tr = self._transaction()
        marker = self.key(tenant, "batches", part_id)
        while True:
            try:
                seen_marker = tr.get(marker)
                seen_ids = [tr.get(row.id_key) for row in rows]
                if seen_marker.present():
                    return  # committed by an earlier attempt whose outcome we were not told (1021)
                for n, (row, seen) in enumerate(zip(rows, seen_ids, strict=True)):
                    if seen.present():
                        continue  # this event already landed in another batch
                    e = row.event
                    tr.set_versionstamped_key(self._vs_key(tenant, "audit", fdbtuple.Versionstamp(), n), row.value)
                    tr.set_versionstamped_key(
                        self._vs_key(tenant, "audit_by_path", row.path_key, fdbtuple.Versionstamp(), n),
                        e.id.encode(),
                    )
                    tr.set_versionstamped_value(
                        row.id_key, fdbtuple.pack_with_versionstamp((fdbtuple.Versionstamp(), n))
                    )
                if self._parts_written % PRUNE_EVERY == 0:
                    self._prune_markers(tr, tenant)  # before the marker is set: mutations apply in order
                tr.set(marker, fdbtuple.pack((int(time.time()),)))
                tr.commit().wait()
                self._parts_written += 1
                return
            except self._error as exc:
                if getattr(exc, "code", None) in TOO_LARGE:
                    raise _TooLarge from None
                try:
                    tr.on_error(exc).wait()
                except self._error as final:
                    raise store_error(final) from None

    def _prune_markers(self, tr: Any, tenant: str) -> None:
        """Batch ids are UUIDv7 (time first, fixed-width hex), so markers older than the retention are
        one key range: growth is bounded by the batches of one retention period."""
        cutoff_ms = int((time.time() - self._retention_s) * 1000)
        text = f"{max(cutoff_ms, 0):012x}"
        begin, _ = self._tenant_range(tenant, "batches")
        tr.clear_range(begin, self.key(tenant, "batches", f"{text[:8]}-{text[8:]}"))

    # Reading -------------------------------------------------------------------------------------

    def read(self, query: EventQuery, after: Cursor | None = None) -> Iterator[tuple[Cursor, Event]]:
        begin, end = self._tenant_range(query.tenant_id, "audit")
        if after:
            begin = bytes(after) + b"\x00"
        count = 0
        while True:
            page = self._read_page(begin, end)
            for key, value in page:
                event = decode_event(query.tenant_id, value)
                if not query.matches(event):
                    continue
                yield key, event
                count += 1
                if query.limit is not None and count >= query.limit:
                    return
            if len(page) < PAGE_ROWS:
                return
            begin = page[-1][0] + b"\x00"

    def _read_page(self, begin: bytes, end: bytes) -> list[tuple[bytes, bytes]]:
        """One transaction per page keeps every read inside FoundationDB's 5-second window."""
        tr = self._transaction()
        while True:
            try:
                return [(kv.key, kv.value) for kv in tr.get_range(begin, end, limit=PAGE_ROWS)]
            except self._error as exc:
                try:
                    tr.on_error(exc).wait()
                except self._error as final:
                    raise store_error(final) from None

    # Checks --------------------------------------------------------------------------------------

    def ping(self) -> None:
        tr = self._transaction()
        try:
            tr.get_read_version().wait()
        except self._error as exc:
            raise store_error(exc) from None

    def cluster_status(self) -> dict[str, Any]:
        """The cluster's own status document (the special key `\\xff\\xff/status/json`)."""
        tr = self._transaction()
        try:
            raw = tr.get(b"\xff\xff/status/json").value
        except self._error as exc:
            raise store_error(exc) from None
        return json.loads(raw) if raw else {}

    def probe(self, tenant_id: str) -> None:
        """Write, read back and clear a probe key under the tenant's prefix (`codi2 test`)."""
        key = self.key(tenant_id, "probe", str(uuid.uuid4()))
        token = os.urandom(16)
        try:
            tr = self._transaction()
            tr.set(key, token)
            tr.commit().wait()
            tr = self._transaction()
            if tr.get(key).value != token:
                raise StoreError("fdb: probe key read back wrong", code="probe_mismatch")
            tr.clear(key)
            tr.commit().wait()
        except self._error as exc:
            raise store_error(exc) from None

    def close(self) -> None:
        """The network thread belongs to the process; FDB stops it at exit."""
