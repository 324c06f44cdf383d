"""FoundationDB sink: tenant-scoped, idempotent transactions of at most 1 MB. Layout: docs/fdb-layout.md,
and `codec` for the keys and values.

Exactly once: every transaction reads the `event_ids` key of each event it carries and writes only the
events whose key is absent, together with that key. A retry after `commit_unknown_result` (1021), a
replayed batch, a batch cut into different parts, or an event re-sent in another batch therefore lands
once, however the batch is split. Versionstamped keys give one commit order across every pod of a tenant.

A chained batch's header goes to the tenant's `chain` subspace in the transaction of the batch's last part,
with the audit keys of all its events, so a header is never stored before its events are.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import fdb
import fdb.tuple as fdbtuple

from codi2.config import Settings
from codi2.stores.base import Cursor, StoredBatch, StoreError
from codi2.stores.fdb import codec
from codi2.stores.fdb.client import load_fdb, resolve_cluster_file, set_network_options, store_error
from codi2.stores.fdb.codec import N_MAX, VALUE_MAX, Keys, Locator, PathKey
from codi2.trail.events import Batch, BatchHeader, Event, EventQuery

PAGE_ROWS = 1000
PRUNE_EVERY = 100
# transaction_too_large, key_too_large, value_too_large: a smaller part may fit, one event alone never will.
TOO_LARGE = frozenset({2101, 2102, 2103})

T = TypeVar("T")


def open_fdb_sink(settings: Settings, *, writer: bool) -> FdbSink:
    """The daemon's sink (`writer`: scoped to its own tenant) or a reader's, on the configured cluster."""
    fdb_settings = settings.foundationdb
    api = load_fdb(fdb_settings.api_version)
    set_network_options(api.options, fdb_settings)  # before api.open, which starts the client's network
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


@dataclass(frozen=True, slots=True)
class _Row:
    event: Event
    value: bytes
    path_key: PathKey
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
        self._keys = Keys(root)
        self._timeout_ms = timeout_ms
        self._retry_limit = retry_limit
        self._batch_bytes = batch_bytes
        self._retention_s = id_retention_s
        self._parts_written = 0

    def key(self, *parts: Any) -> bytes:
        """A key under this sink's root prefix (tests and tampering reach keys through it)."""
        return self._keys.key(*parts)

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
        tenant, vs, keys = event.tenant_id, fdbtuple.Versionstamp(), self._keys
        value = codec.encode_event(event)
        path_key = codec.path_key(event.path)
        id_key = keys.event_id(tenant, event.id)
        written_keys = (
            len(keys.audit(tenant, vs, N_MAX)) + len(keys.audit_by_path(tenant, path_key, vs, N_MAX)) + len(id_key)
        )
        if len(value) > VALUE_MAX:
            written_keys += -(-len(value) // VALUE_MAX) * len(keys.audit_chunk(tenant, vs, N_MAX, N_MAX))
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
                where[offset + n] = codec.decode_locator(seen)
                continue
            where[offset + n] = (None, n)
            self._set_row(tr, tenant, row, n)
            written = True
            if n and tr.get_approximate_size().wait() > self._batch_bytes:
                raise _Overflow(n)
        if header is not None:
            tr.set_versionstamped_value(
                self._keys.chain(tenant, header.stream_id, header.number), codec.encode_header(header, where)
            )
            if len(rows) > 1 and tr.get_approximate_size().wait() > self._batch_bytes:
                raise _Overflow(len(rows) - 1)
        return tr.get_versionstamp() if written else None

    def _set_row(self, tr: Any, tenant: str, row: _Row, n: int) -> None:
        vs, keys = fdbtuple.Versionstamp(), self._keys
        if len(row.value) <= VALUE_MAX:
            tr.set_versionstamped_key(keys.audit(tenant, vs, n), row.value)
        else:  # a path too long for one value: the encoded event is split across keys of its own
            tr.set_versionstamped_key(keys.audit(tenant, vs, n), codec.CHUNKED)
            for i, chunk in enumerate(codec.chunks(row.value)):
                tr.set_versionstamped_key(keys.audit_chunk(tenant, vs, n, i), chunk)
        tr.set_versionstamped_key(keys.audit_by_path(tenant, row.path_key, vs, n), row.event.id.encode())
        tr.set_versionstamped_value(row.id_key, codec.encode_locator(vs, n))

    def _never_fits(self, row: _Row, error: Any) -> StoreError:
        return StoreError(
            f"fdb: event {row.event.id} ({row.event.action} of a {len(os.fsencode(row.event.path)):,}-byte path) can"
            f" never be committed: {error.description.decode(errors='replace')} ({error.code})",
            code="event_too_large",
            retryable=False,
        )

    def _prune_event_ids(self, tr: Any, tenant: str) -> None:
        """The id space holds one retention period of events. Cleared after the ids were read and before
        any is set, so an old event re-sent now keeps the key it is given."""
        cutoff_ms = int((time.time() - self._retention_s) * 1000)
        tr.clear_range(*self._keys.event_ids_before(tenant, cutoff_ms))

    # Reading -------------------------------------------------------------------------------------

    def read(self, query: EventQuery, after: Cursor | None = None) -> Iterator[tuple[Cursor, Event]]:
        begin, end = self._keys.namespace_range(query.tenant_id, "audit")
        if after is not None:
            if not isinstance(after, bytes):
                raise TypeError("fdb: a read cursor is a key (bytes)")
            begin = min(max(begin, after + b"\x00"), end)  # a cursor never leads out of the tenant's range
        rows = self._scan(query.tenant_id, begin, end)
        yield from query.select((key, codec.decode_event(query.tenant_id, value)) for key, value in rows)

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
            if value == codec.CHUNKED:
                chunks = tr.get_range_startswith(self._keys.audit_chunks(tenant, *self._keys.audit_locator(kv.key)))
                value = b"".join(chunk.value for chunk in chunks)
            page.append((kv.key, value))
        return page

    def streams(self, tenant_id: str) -> list[str]:
        """One read per stream: from each stream's first header key to the next stream's."""
        begin, end = self._keys.namespace_range(tenant_id, "chain")
        found: list[str] = []
        while key := self._run(partial(self._first_key, begin, end)):
            stream: str = self._keys.unpack(key)[2]
            found.append(stream)
            begin = self._keys.chain_stream(tenant_id, stream) + b"\xff"
        return found

    def _first_key(self, begin: bytes, end: bytes, tr: Any) -> bytes | None:
        return next((kv.key for kv in tr.get_range(begin, end, limit=1)), None)

    def batches(self, tenant_id: str, stream_id: str) -> Iterator[StoredBatch]:
        base = self._keys.chain_stream(tenant_id, stream_id)
        for key, value in self._scan(tenant_id, base + b"\x00", base + b"\xff"):
            header, where = codec.decode_header(stream_id, self._keys.unpack(key)[3], value)
            yield StoredBatch(header, where)

    def batch_events(self, tenant_id: str, batch: StoredBatch) -> list[tuple[Cursor, Event]]:
        found: list[tuple[Cursor, Event]] = []
        for version, first, count in batch.where:
            vs = fdbtuple.Versionstamp(version)
            begin, end = self._keys.audit(tenant_id, vs, first), self._keys.audit(tenant_id, vs, first + count)
            found += [(key, codec.decode_event(tenant_id, value)) for key, value in self._scan(tenant_id, begin, end)]
        return found

    # Checks --------------------------------------------------------------------------------------

    def ping(self) -> None:
        self._run(lambda tr: tr.get_read_version().wait())

    def cluster_status(self) -> dict[str, Any]:
        """The cluster's own status document (the special key `\\xff\\xff/status/json`)."""
        raw = self._run(lambda tr: tr.get(b"\xff\xff/status/json").value)
        status: dict[str, Any] = json.loads(raw) if raw else {}
        return status

    def probe(self, tenant_id: str) -> None:
        """Write, read back and clear a probe key under the tenant's prefix (`codi2 test`), each step in the
        retry loop of every transaction. The key is cleared even when a step failed: a write whose outcome
        was unknown may have landed."""
        key = self._keys.probe(tenant_id, str(uuid.uuid4()))
        token = os.urandom(16)
        try:
            self._run(lambda tr: tr.set(key, token))
            if self._run(lambda tr: tr.get(key).value) != token:
                raise StoreError("fdb: probe key read back wrong", code="probe_mismatch")
        finally:
            self._run(lambda tr: tr.clear(key))

    def close(self) -> None:
        """The network thread belongs to the process; FDB stops it at exit."""
