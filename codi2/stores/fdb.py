"""FoundationDB sink: tenant-scoped, idempotent transactions of at most 1 MB. Layout: docs/fdb-layout.md.

Written against the official `fdb` bindings. Only pure-Python parts of them (`fdb.tuple`, the API version
they were built for) are used at import time; `libfdb_c` is loaded by `load_fdb` when a store is opened, so
the package imports where the C library is not installed.

Exactly once: every transaction reads the `event_ids` key of each event it carries and writes only the
events whose key is absent, together with that key. A retry after `commit_unknown_result` (1021), a
replayed batch, a batch cut into different parts, or an event re-sent in another batch therefore lands
once, however the batch is split. Versionstamped keys give one commit order across every pod of a tenant.

A chained batch's header goes to the tenant's `chain` subspace in the transaction of the batch's last part,
with the audit keys of all its events, so a header is never stored before its events are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import fdb
import fdb.tuple as fdbtuple

from codi2.cli.tls import set_network_options as set_tls_options
from codi2.config import Settings
from codi2.stores.base import Cursor, StoredBatch, StoreError
from codi2.trail.events import Batch, BatchHeader, Event, EventQuery

VALUE_FORMAT = 1
CHAIN_FORMAT = 1
CHUNKED = fdbtuple.pack((2,))  # the audit value of an event too long for one value: it is in `audit_chunks`
VALUE_MAX = 100_000  # FoundationDB's limit on a value (bytes)
PATH_KEY_MAX = 2048  # longer paths are hashed in the by-path key, which keeps keys under FDB's 10,000 bytes
PAGE_ROWS = 1000
PRUNE_EVERY = 100
# transaction_too_large, key_too_large, value_too_large: a smaller part may fit, one event alone never will.
TOO_LARGE = frozenset({2101, 2102, 2103})
CLUSTER_LINE = re.compile(r"^(?P<desc>[A-Za-z0-9_]+):(?P<id>[A-Za-z0-9]+)@(?P<coords>\S+)$")

T = TypeVar("T")
Locator = tuple[bytes | None, int]  # an event's audit key: (commit version, n); None: the current transaction's


def store_error(exc: Any) -> StoreError:
    """An `fdb.FDBError` as a StoreError: the client library's description (bytes in the bindings) and a code
    that is the FDB error number, so no table of names can drift from the library."""
    return StoreError(f"fdb: {exc.description.decode(errors='replace')} ({exc.code})", code=f"fdb_{exc.code}")


def bindings_series() -> str:
    """The client series the installed bindings need (e.g. "7.3"): libfdb_c must support their API version."""
    latest = fdb.LATEST_API_VERSION
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
        return fdb
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
    return fdb


def client_library_version(fdb_module: Any) -> str:
    """The max API version the loaded libfdb_c supports (its release series)."""
    return str(fdb_module.impl._capi.fdb_get_max_api_version())


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


def open_fdb_sink(settings: Settings, *, writer: bool) -> FdbSink:
    """The daemon's sink (`writer`: scoped to its own tenant) or a reader's, on the configured cluster."""
    fdb_settings = settings.foundationdb
    api = load_fdb(fdb_settings.api_version)
    set_tls_options(api.options, fdb_settings)  # before api.open, which starts the client's network
    cluster_file = resolve_cluster_file(settings)
    try:
        db = api.open(str(cluster_file))
    except api.FDBError as exc:
        raise store_error(exc) from None
    return FdbSink(
        db,
        tenant_id=settings.tenant_id if writer else None,
        root=fdb_settings.root_prefix,
        timeout_ms=fdb_settings.transaction_timeout_ms,
        retry_limit=fdb_settings.retry_limit,
        batch_bytes=fdb_settings.batch_bytes,
        id_retention_s=fdb_settings.event_id_retention_hours * 3600,
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
    path_key: bytes | tuple[str, str]
    id_key: bytes
    size: int  # a first guess of what FoundationDB counts for it; get_approximate_size() has the last word


class _TooLarge(Exception):
    """FoundationDB refused a transaction for its size."""

    def __init__(self, error: Any) -> None:
        super().__init__(error)
        self.error = error


class _Overflow(Exception):
    """The first `fits` rows of a part are within the budget; the next one is not."""

    def __init__(self, fits: int) -> None:
        super().__init__(fits)
        self.fits = fits


class FdbSink:
    """`db` is an `fdb.Database` (tests wrap one to inject faults at exact points)."""

    name = "fdb"

    def __init__(
        self,
        db: Any,
        *,
        tenant_id: str | None,
        root: Sequence[str] = ("codi2",),
        timeout_ms: int = 5000,
        retry_limit: int = 10,
        batch_bytes: int = 1_000_000,
        id_retention_s: float = 7 * 86400,
    ) -> None:
        self._db = db
        self._tenant = tenant_id
        self._prefix = fdbtuple.pack(tuple(root))
        self._timeout_ms = timeout_ms
        self._retry_limit = retry_limit
        self._batch_bytes = batch_bytes
        self._retention_s = id_retention_s
        self._parts_written = 0

    # Keys ----------------------------------------------------------------------------------------

    def key(self, *parts: Any) -> bytes:
        return self._prefix + fdbtuple.pack(parts)

    def _vs_key(self, *parts: Any) -> bytes:
        return fdbtuple.pack_with_versionstamp(parts, prefix=self._prefix)

    def _range(self, tenant_id: str, namespace: str) -> tuple[bytes, bytes]:
        base = self.key(tenant_id, namespace)
        return base + b"\x00", base + b"\xff"

    # Transactions --------------------------------------------------------------------------------

    def _run(self, body: Callable[[Any], T]) -> T:
        """FoundationDB's retry loop: run `body` in a transaction and commit. `on_error` decides what is retried
        (with back-off, within the timeout and the retry limit); anything else becomes a StoreError."""
        tr = self._db.create_transaction()
        tr.options.set_timeout(self._timeout_ms)
        tr.options.set_retry_limit(self._retry_limit)
        while True:
            try:
                result = body(tr)
                tr.commit().wait()
                return result
            except fdb.FDBError as exc:
                if exc.code in TOO_LARGE:
                    raise _TooLarge(exc) from None
                try:
                    tr.on_error(exc).wait()
                except fdb.FDBError as final:
                    raise store_error(final) from None

    # Writing -------------------------------------------------------------------------------------

    def write_batch(self, batch: Batch) -> None:
        if self._tenant is not None and any(e.tenant_id != self._tenant for e in batch.events):
            raise ValueError("fdb: refusing to write events of another tenant")  # FDB is no security boundary
        by_tenant: dict[str, dict[str, _Row]] = {}
        for event in batch.events:
            rows = by_tenant.setdefault(event.tenant_id, {})
            if event.id not in rows:  # the same event twice in one batch is stored once
                rows[event.id] = self._row(event)
        if batch.header is not None and len(by_tenant) != 1:
            raise ValueError("fdb: a chained batch holds events of one tenant")
        for tenant, rows in by_tenant.items():
            self._write_rows(tenant, list(rows.values()), batch.header)

    def _row(self, event: Event) -> _Row:
        tenant, vs = event.tenant_id, fdbtuple.Versionstamp()
        value = encode_event(event)
        raw_path = os.fsencode(event.path)
        path_key: bytes | tuple[str, str] = raw_path
        if len(raw_path) > PATH_KEY_MAX:
            path_key = ("sha256", hashlib.sha256(raw_path).hexdigest())
        id_key = self.key(tenant, "event_ids", event.id)
        written_keys = (
            len(self._vs_key(tenant, "audit", vs, 0xFFFF))
            + len(self._vs_key(tenant, "audit_by_path", path_key, vs, 0xFFFF))
            + len(id_key)
        )
        if len(value) > VALUE_MAX:
            chunks = -(-len(value) // VALUE_MAX)
            written_keys += chunks * len(self._vs_key(tenant, "audit_chunks", vs, 0xFFFF, 0xFFFF))
        # FDB counts every written key twice (the mutation and its conflict range), each value once, and the
        # id key twice more for the read of it.
        size = 2 * written_keys + 2 * len(id_key) + len(value) + len(event.id) + 64
        return _Row(event, value, path_key, id_key, size)

    def _write_rows(self, tenant: str, rows: list[_Row], header: BatchHeader | None) -> None:
        """Commit the rows in order, each transaction the longest run that FoundationDB counts as within
        the budget. Whatever is cut where, each event is written once (the id keys decide). The header,
        with where each event is, goes with the last part."""
        where: list[Locator] = [(None, 0)] * len(rows)
        start = 0
        while start < len(rows):
            count, size = 0, 0
            for row in rows[start:]:
                if count and size + row.size > self._batch_bytes:
                    break
                count, size = count + 1, size + row.size
            while True:
                part = rows[start : start + count]
                last = header if start + count == len(rows) else None
                try:
                    written = self._run(partial(self._write_part, tenant, part, where, start, last))
                    break
                except _Overflow as over:
                    count = over.fits
                except _TooLarge as too_large:
                    if count == 1:
                        raise self._never_fits(rows[start], too_large.error) from None
                    count //= 2
            if written is not None and header is not None:  # a later part's header names this commit version
                version = written.value
                where[start : start + count] = [(v or version, n) for v, n in where[start : start + count]]
            self._parts_written += 1
            start += count

    def _write_part(
        self, tenant: str, rows: list[_Row], where: list[Locator], offset: int, header: BatchHeader | None, tr: Any
    ) -> Any:
        """Write the rows not yet committed, noting in `where[offset:]` where each one is; with `header`
        (the batch's last part), the header too. Returns the future of this commit's versionstamp if it
        wrote rows."""
        futures = [tr.get(row.id_key) for row in rows]  # all issued before the first is waited on
        stored = [f.value for f in futures]
        if self._parts_written % PRUNE_EVERY == 0:
            self._prune_event_ids(tr, tenant)
        written = False
        for n, (row, seen) in enumerate(zip(rows, stored, strict=True)):
            if seen is not None:  # already committed: by an attempt we were not told about (1021), or earlier
                vs, at = fdbtuple.unpack(seen)
                where[offset + n] = (vs.tr_version, at)
                continue
            where[offset + n] = (None, n)
            self._set_row(tr, tenant, row, n)
            written = True
            if n and tr.get_approximate_size().wait() > self._batch_bytes:
                raise _Overflow(n)
        if header is not None:
            self._set_header(tr, tenant, header, where)
            if len(rows) > 1 and tr.get_approximate_size().wait() > self._batch_bytes:
                raise _Overflow(len(rows) - 1)
        return tr.get_versionstamp() if written else None

    def _set_header(self, tr: Any, tenant: str, h: BatchHeader, where: list[Locator]) -> None:
        """The header with the batch's events as runs (commit version, first n, count) of audit keys; a
        version None is this transaction's, which FoundationDB writes into the value's versionstamp."""
        runs: list[list[Any]] = []
        for version, n in where:
            if runs and runs[-1][0] == version and runs[-1][1] + runs[-1][2] == n:
                runs[-1][2] += 1
            else:
                runs.append([version, n, 1])
        value = fdbtuple.pack_with_versionstamp(
            (CHAIN_FORMAT, fdbtuple.Versionstamp(), h.ts, h.prev, h.link, h.key_id, h.events, tuple(map(tuple, runs)))
        )
        tr.set_versionstamped_value(self.key(tenant, "chain", h.stream_id, h.number), value)

    def _set_row(self, tr: Any, tenant: str, row: _Row, n: int) -> None:
        vs = fdbtuple.Versionstamp()
        if len(row.value) <= VALUE_MAX:
            tr.set_versionstamped_key(self._vs_key(tenant, "audit", vs, n), row.value)
        else:  # a path too long for one value: the encoded event is split across keys of its own
            tr.set_versionstamped_key(self._vs_key(tenant, "audit", vs, n), CHUNKED)
            for i in range(0, len(row.value), VALUE_MAX):
                chunk_key = self._vs_key(tenant, "audit_chunks", vs, n, i // VALUE_MAX)
                tr.set_versionstamped_key(chunk_key, row.value[i : i + VALUE_MAX])
        tr.set_versionstamped_key(self._vs_key(tenant, "audit_by_path", row.path_key, vs, n), row.event.id.encode())
        tr.set_versionstamped_value(row.id_key, fdbtuple.pack_with_versionstamp((vs, n)))

    def _never_fits(self, row: _Row, error: Any) -> StoreError:
        return StoreError(
            f"fdb: event {row.event.id} ({row.event.action} of a {len(os.fsencode(row.event.path)):,}-byte path) can"
            f" never be committed: {error.description.decode(errors='replace')} ({error.code})",
            code="event_too_large",
            retryable=False,
        )

    def _prune_event_ids(self, tr: Any, tenant: str) -> None:
        """Event ids are UUIDv7 (time first, fixed-width hex), so the ids older than the retention are one
        key range: the id space holds one retention period of events. Cleared after the ids were read and
        before any is set, so an old event re-sent now keeps the key it is given."""
        cutoff_ms = int((time.time() - self._retention_s) * 1000)
        text = f"{max(cutoff_ms, 0):012x}"
        begin, _ = self._range(tenant, "event_ids")
        tr.clear_range(begin, self.key(tenant, "event_ids", f"{text[:8]}-{text[8:]}"))

    # Reading -------------------------------------------------------------------------------------

    def read(self, query: EventQuery, after: Cursor | None = None) -> Iterator[tuple[Cursor, Event]]:
        begin, end = self._range(query.tenant_id, "audit")
        if after is not None:
            if not isinstance(after, bytes):
                raise TypeError("fdb: a read cursor is a key (bytes)")
            begin = min(max(begin, after + b"\x00"), end)  # a cursor never leads out of the tenant's range
        rows = self._scan(query.tenant_id, begin, end)
        yield from query.select((key, decode_event(query.tenant_id, value)) for key, value in rows)

    def _scan(self, tenant: str, begin: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
        while begin < end:
            page = self._run(partial(self._read_page, tenant, begin, end))
            yield from page
            if len(page) < PAGE_ROWS:
                return
            begin = page[-1][0] + b"\x00"

    def _read_page(self, tenant: str, begin: bytes, end: bytes, tr: Any) -> list[tuple[bytes, bytes]]:
        """One transaction per page keeps every read inside FoundationDB's 5-second window; `exact` asks for
        the page's rows in one batch."""
        page = []
        for kv in tr.get_range(begin, end, limit=PAGE_ROWS, streaming_mode=fdb.StreamingMode.exact):
            value = kv.value
            if value == CHUNKED:
                _, _, vs, n = fdbtuple.unpack(kv.key, prefix_len=len(self._prefix))
                chunks = tr.get_range_startswith(self.key(tenant, "audit_chunks", vs, n))
                value = b"".join(chunk.value for chunk in chunks)
            page.append((kv.key, value))
        return page

    def streams(self, tenant_id: str) -> list[str]:
        """One read per stream: from each stream's first header key to the next stream's."""
        begin, end = self._range(tenant_id, "chain")
        found: list[str] = []
        while key := self._run(partial(self._first_key, begin, end)):
            stream = fdbtuple.unpack(key, prefix_len=len(self._prefix))[2]
            found.append(stream)
            begin = self.key(tenant_id, "chain", stream) + b"\xff"
        return found

    def _first_key(self, begin: bytes, end: bytes, tr: Any) -> bytes | None:
        return next((kv.key for kv in tr.get_range(begin, end, limit=1)), None)

    def batches(self, tenant_id: str, stream_id: str) -> Iterator[StoredBatch]:
        base = self.key(tenant_id, "chain", stream_id)
        for key, value in self._scan(tenant_id, base + b"\x00", base + b"\xff"):
            number = fdbtuple.unpack(key, prefix_len=len(self._prefix))[3]
            fmt, own, ts, prev, link, key_id, events, runs = fdbtuple.unpack(value)
            if fmt != CHAIN_FORMAT:
                raise StoreError(f"fdb: unknown batch header format {fmt}", code="bad_value")
            where = tuple((version or own.tr_version, first, count) for version, first, count in runs)
            yield StoredBatch(BatchHeader(stream_id, number, ts, prev, link, key_id, events), where)

    def batch_events(self, tenant_id: str, batch: StoredBatch) -> list[tuple[Cursor, Event]]:
        found: list[tuple[Cursor, Event]] = []
        for version, first, count in batch.where:
            vs = fdbtuple.Versionstamp(version)
            begin, end = self.key(tenant_id, "audit", vs, first), self.key(tenant_id, "audit", vs, first + count)
            found += [(key, decode_event(tenant_id, value)) for key, value in self._scan(tenant_id, begin, end)]
        return found

    # Checks --------------------------------------------------------------------------------------

    def ping(self) -> None:
        self._run(lambda tr: tr.get_read_version().wait())

    def cluster_status(self) -> dict[str, Any]:
        """The cluster's own status document (the special key `\\xff\\xff/status/json`)."""
        raw = self._run(lambda tr: tr.get(b"\xff\xff/status/json").value)
        return json.loads(raw) if raw else {}

    def probe(self, tenant_id: str) -> None:
        """Write, read back and clear a probe key under the tenant's prefix (`codi2 test`), each step in the
        retry loop of every transaction. The key is cleared even when a step failed: a write whose outcome
        was unknown may have landed."""
        key = self.key(tenant_id, "probe", str(uuid.uuid4()))
        token = os.urandom(16)
        try:
            self._run(lambda tr: tr.set(key, token))
            if self._run(lambda tr: tr.get(key).value) != token:
                raise StoreError("fdb: probe key read back wrong", code="probe_mismatch")
        finally:
            self._run(lambda tr: tr.clear(key))

    def close(self) -> None:
        """The network thread belongs to the process; FDB stops it at exit."""
