"""FoundationDB sink, layout v2: tenant-scoped transactions of at most 1 MB, one per batch normally.
Layout: docs/fdb-layout.md, and `codec` for the keys and values.

A batch's events go to the tenant's `log` as pieces (the chain's records, compressed) under versionstamped
keys, so a tenant's trail is one commit order across every pod. Exactly once, without a read per event: a
chained batch's `c` key (its place in its stream) says how many of its events are stored; every transaction
reads it first, writes the pieces after those, and moves it on. A retry after `commit_unknown_result`
(1021), a replayed batch, or a batch cut into other transactions therefore lands once, and nothing is ever
cleared on the write path. A batch without a header (an outbox row from before chaining) has no place in a
stream: its events are checked one by one against the `ids` keys, the one per-event read left.

A store written by codi2 0.2 (layout v1: `audit`, `chain`) stays readable: reads give its events first, then
the log's, and a stream begun in v1 goes on in v2 with its next number.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from heapq import merge
from itertools import chain, takewhile
from typing import Any, TypeVar

import fdb
import fdb.tuple as fdbtuple

from codi2.config import Settings
from codi2.stores.base import Cursor, Horizon, PrunedStream, RetentionPlan, StoredBatch, StoreError, StreamEntry
from codi2.stores.fdb import codec
from codi2.stores.fdb.client import load_fdb, resolve_cluster_file, set_network_options, store_error
from codi2.stores.fdb.codec import VS_LEN, Keys
from codi2.trail.chain import ZERO
from codi2.trail.events import Batch, BatchHeader, Event, EventQuery, rfc3339

PAGE_ROWS = 1000  # v1 audit rows per read transaction
PAGE_PIECES = 16  # v2 pieces per read transaction: at most ~1.5 MB
PIECE_MAX = 90_000  # compressed records per piece, below FoundationDB's 100,000-byte value
PIECE_OVERHEAD = 200  # what FoundationDB counts for a piece besides its value and key (twice: mutation, conflict)
TX_OVERHEAD = 2_000  # the `c`, `t`, `s` and `streams` keys and the read of `c`, in a transaction's budget
CLOCK_SKEW_S = 2  # the `t` index is keyed by each pod's clock: how far apart two pods' clocks may be
# transaction_too_large, key_too_large, value_too_large: fewer events may fit, one event alone never will.
TOO_LARGE = frozenset({2101, 2102, 2103})
CLEARS_PER_TX = 500  # horizons, sessions or streams handled per transaction of a prune
V1_NAMESPACES = ("audit", "audit_chunks", "audit_by_path", "event_ids", "chain")

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
    )


class _TooLarge(Exception):
    """FoundationDB refused a transaction for its size."""

    def __init__(self, error: Any) -> None:
        super().__init__(error)
        self.error = error


class _Overflow(Exception):
    """The first `fits` pieces of a transaction are within the budget; the next one is not."""

    def __init__(self, fits: int) -> None:
        super().__init__(fits)
        self.fits = fits


@dataclass(slots=True)
class _Cut:
    """How one batch is cut into transactions and pieces: no limit until FoundationDB refuses a size, and what
    the last attempt held, to know what to halve."""

    pieces: int | None = None  # per transaction
    events: int | None = None  # per piece
    tried_pieces: int = 0
    tried_events: int = 0
    first_event: Event | None = None


@dataclass(frozen=True, slots=True)
class _Written:
    """What one committed transaction of a batch did (state the sink keeps is updated only after a commit)."""

    done: bool  # the batch is complete
    registered: bool  # the stream's registry entry exists
    v1_head: int  # the stream's last batch number in layout v1 (0: none)


@dataclass(frozen=True, slots=True)
class _Pieces:
    """What a transaction took of a batch: pieces, and the events in them."""

    pieces: int
    events: int


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._tenant = tenant_id
        self._keys = Keys(root)
        self._timeout_ms = timeout_ms
        self._retry_limit = retry_limit
        self._batch_bytes = batch_bytes
        self._clock = clock  # the `t` index's: this pod's clock (tests set it)
        self._backlog = False
        self._streams: dict[tuple[str, str], _Written] = {}  # per (tenant, stream): registry and v1 head, once read

    def key(self, *parts: Any) -> bytes:
        """A key under this sink's root prefix (tests and tampering reach keys through it)."""
        return self._keys.key(*parts)

    def draining_backlog(self, draining: bool) -> None:
        """The shipper is replaying a backlog (`True`) or keeping up (`False`): a backlog's writes run at batch
        priority, which FoundationDB serves after default-priority work and throttles first, so a pod
        catching up after an outage cannot starve interactive traffic."""
        self._backlog = draining

    # Transactions --------------------------------------------------------------------------------

    def _run(self, body: Callable[[Any], T], tenant: str | None = None, *, write: bool = False) -> T:
        """FoundationDB's retry loop: run `body` in a transaction and commit. `on_error` decides what is retried
        (with back-off, within the timeout and the retry limit); anything else becomes a StoreError. A tenant's
        transactions carry its tag, so FoundationDB's tag throttling can single out a noisy tenant."""
        tr = self._db.create_transaction()
        tr.options.set_timeout(self._timeout_ms)
        tr.options.set_retry_limit(self._retry_limit)
        if tenant is not None:
            tr.options.set_auto_throttle_tag(codec.throttle_tag(tenant))
        if write and self._backlog:
            tr.options.set_priority_batch()
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
        by_tenant: dict[str, dict[str, Event]] = {}
        for event in batch.events:
            by_tenant.setdefault(event.tenant_id, {}).setdefault(event.id, event)  # twice in a batch: once
        if batch.header is not None and len(by_tenant) > 1:
            raise ValueError("fdb: a chained batch holds events of one tenant")
        for tenant, events in by_tenant.items():
            self._write(tenant, list(events.values()), batch.header)

    def _write(self, tenant: str, events: list[Event], header: BatchHeader | None) -> None:
        """Commit transactions until the batch is stored. FoundationDB refusing a size halves the pieces per
        transaction, then the events per piece; an event that fits nowhere alone can never commit."""
        cut, start = _Cut(), 0  # start: the events before it are stored (a batch without a header)
        while True:
            if header is None:
                window = events[start : start + (cut.events or len(events))]
                body = partial(self._unchained_tx, tenant, window, cut)
            else:
                body = partial(self._chained_tx, tenant, events, header, cut)
            try:
                written = self._run(body, tenant, write=True)
            except _Overflow as over:
                cut.pieces = over.fits
                continue
            except _TooLarge as too_large:
                if cut.tried_pieces > 1:
                    cut.pieces = cut.tried_pieces // 2
                elif cut.tried_events > 1:
                    cut.events = cut.tried_events // 2
                else:
                    raise self._never_fits(cut.first_event, too_large.error) from None
                continue
            if header is not None:
                self._streams[tenant, header.stream_id] = written
            elif written.done and start + len(window) < len(events):
                start += len(window)
                continue
            if written.done:
                return

    def _chained_tx(self, tenant: str, events: list[Event], header: BatchHeader, cut: _Cut, tr: Any) -> _Written:
        """One transaction of a chained batch: read its `c` key (and, once per stream, the registry and the v1
        head, in the same round trip), then write the pieces after what is stored."""
        keys, stream, number = self._keys, header.stream_id, header.number
        cut.tried_pieces = cut.tried_events = 0
        c_key = keys.progress(tenant, stream, number)
        progress_f = tr.get(c_key)
        known = self._streams.get((tenant, stream))
        registry_f = None if known is not None else tr.get(keys.stream(tenant, stream))
        v1_f = None
        if known is None:
            v1_f = tr.get_range(*keys.namespace_range(tenant, "chain", stream), limit=1, reverse=True)
        v1_head = known.v1_head if known is not None else max((keys.unpack(kv.key)[3] for kv in v1_f or ()), default=0)
        registered = known.registered if known is not None else registry_f is not None and registry_f.value is not None
        stored = progress_f.value
        done, runs = 0, list[codec.Run]()
        if stored is not None:
            progress = codec.decode_progress(stream, number, stored)
            done, runs = progress.done, list(progress.runs)
        elif number <= v1_head and tr.get(keys.chain(tenant, stream, number)).value is not None:
            done = len(events)  # committed by codi2 0.2 (layout v1), replayed after the upgrade
        if done >= len(events):
            return _Written(True, registered, v1_head)
        # Read before anything is written: a key this transaction versionstamps is unreadable in it.
        first = events[0]
        predecessor = None if registered else self._head_before(tr.snapshot, tenant, stream, first.user_id, first.pod)
        written = self._put_pieces(tr, tenant, stream, number, events, done, cut)
        runs.append((None, 0, written.pieces))
        tr.set_versionstamped_value(c_key, codec.encode_progress(header, done + written.events, runs))
        self._put_indexes(tr, tenant, events[done : done + written.events])
        if not registered:
            value = codec.encode_stream(first.user_id, first.pod, header.ts, predecessor)
            tr.set(keys.stream(tenant, stream), value)
        return _Written(done + written.events >= len(events), True, v1_head)

    def _head_before(self, snap: Any, tenant: str, stream: str, user: str, pod: str) -> tuple[str, int, bytes] | None:
        """The head (stream, number, link) of the stream this user's pod wrote before `stream`: the latest
        registered one, and its last batch in either layout (its horizon when pruned whole). Snapshot reads,
        in the transaction that registers `stream` (once per stream): registering never conflicts with another
        pod registering its own."""
        keys = self._keys
        previous: tuple[str, str] | None = None  # (first_ts, stream)
        for kv in snap.get_range(*keys.namespace_range(tenant, "streams")):
            other: str = keys.unpack(kv.key)[2]
            owner, on, first_ts, _ = codec.decode_stream(kv.value)
            if (owner, on) == (user, pod) and other != stream and (previous is None or first_ts >= previous[0]):
                previous = (first_ts, other)
        if previous is None:
            return None
        last_stream = previous[1]
        c = snap.get_range(*keys.namespace_range(tenant, "c", last_stream), limit=1, reverse=True)
        v1 = snap.get_range(*keys.namespace_range(tenant, "chain", last_stream), limit=1, reverse=True)
        found = [codec.decode_progress(last_stream, keys.unpack(kv.key)[3], kv.value).header for kv in c]
        found += [codec.decode_v1_header(last_stream, keys.unpack(kv.key)[3], kv.value)[0] for kv in v1]
        last = max(found, key=lambda h: h.number, default=None)
        if last is not None:
            return (last_stream, last.number, last.link)
        pruned = snap.get(keys.horizon(tenant, last_stream)).value  # pruned whole: its horizon is its head
        if pruned is None:
            return (last_stream, 0, ZERO)
        number, link, _ = codec.decode_horizon(pruned)
        return (last_stream, number, link)

    def _unchained_tx(self, tenant: str, events: list[Event], cut: _Cut, tr: Any) -> _Written:
        """One transaction of a batch without a header (`events`: a window of it, as many as FoundationDB lets
        one transaction read the ids of): its events not yet stored (by this layout's `ids` keys, or v1's
        `event_ids`) go in pieces, each with its `ids` key."""
        keys = self._keys
        cut.tried_pieces, cut.tried_events, cut.first_event = 0, len(events), events[0]
        futures = [(tr.get(keys.event_id(tenant, e.id)), tr.get(keys.v1_event_id(tenant, e.id))) for e in events]
        todo = [e for e, (ids, v1) in zip(events, futures, strict=True) if ids.value is None and v1.value is None]
        if not todo:
            return _Written(True, False, 0)
        written = self._put_pieces(tr, tenant, None, None, todo, 0, cut)
        for event in todo[: written.events]:
            tr.set(keys.event_id(tenant, event.id), b"")
        self._put_indexes(tr, tenant, todo[: written.events])
        return _Written(written.events >= len(todo), False, 0)

    def _put_pieces(
        self,
        tr: Any,
        tenant: str,
        stream: str | None,
        number: int | None,
        events: list[Event],
        done: int,
        cut: _Cut,
    ) -> _Pieces:
        """Set the pieces of `events[done:]` that the budget holds (at least one): the size is predicted before
        a piece is added and checked with `get_approximate_size()` after, so a full batch commits at once."""
        vs = fdbtuple.Versionstamp()
        key_len = len(self._keys.log_part(tenant, vs, codec.N_MAX, codec.N_MAX))
        budget = self._batch_bytes - TX_OVERHEAD
        size, count, p = 0, 0, 0
        for first, n, value in self._pieces(stream, number, events, done, cut):
            parts = codec.split_value(value)
            predicted = len(value) + len(parts) * (2 * key_len + PIECE_OVERHEAD)
            if p and (size + predicted > budget or p == cut.pieces):
                break
            if not p and n >= cut.tried_events:
                cut.tried_events, cut.first_event = n, events[first]
            tr.set_versionstamped_key(self._keys.log(tenant, vs, p), parts[0])
            for i, part in enumerate(parts[1:], 1):
                tr.set_versionstamped_key(self._keys.log_part(tenant, vs, p, i), part)
            if p and tr.get_approximate_size().wait() > self._batch_bytes:
                raise _Overflow(p)
            size, count, p = size + predicted, count + n, p + 1
        cut.tried_pieces = p
        return _Pieces(p, count)

    def _pieces(
        self, stream: str | None, number: int | None, events: list[Event], start: int, cut: _Cut
    ) -> Iterator[tuple[int, int, bytes]]:
        """(first event, events, value) of each piece from `start`, compressed as the transaction takes them:
        as many events as fit PIECE_MAX (or the budget, when smaller) compressed."""
        cap = min(PIECE_MAX, self._batch_bytes - TX_OVERHEAD)
        while start < len(events):
            count = min(len(events) - start, cut.events or len(events))
            value = codec.encode_piece(stream, number, start, events[start : start + count])
            while len(value) > cap and count > 1:
                count = max(1, min(count - 1, count * cap * 9 // (10 * len(value))))
                value = codec.encode_piece(stream, number, start, events[start : start + count])
            yield start, count, value
            start += count

    def _put_indexes(self, tr: Any, tenant: str, events: Sequence[Event]) -> None:
        """The `t` key of this second (blind: many pods write it without conflicting, the latest commit wins)
        and an `s` key per session the transaction wrote events of."""
        vs = fdbtuple.Versionstamp()
        tr.set_versionstamped_value(self._keys.time_index(tenant, int(self._clock())), codec.versionstamped_value(b""))
        for session in sorted({e.session_id for e in events if e.session_id is not None}):
            tr.set_versionstamped_key(self._keys.session(tenant, session, vs), b"")

    def _never_fits(self, event: Event | None, error: Any) -> StoreError:
        what = "an event" if event is None else f"event {event.id} ({event.action} of a "
        size = "" if event is None else f"{len(os.fsencode(event.path)):,}-byte path)"
        return StoreError(
            f"fdb: {what}{size} can never be committed: {error.description.decode(errors='replace')} ({error.code})",
            code="event_too_large",
            retryable=False,
        )

    # Reading -------------------------------------------------------------------------------------

    def read(self, query: EventQuery, after: Cursor | None = None) -> Iterator[tuple[Cursor, Event]]:
        """v1's events first (older), then the log's: one sequence, a cursor saying which range it is in and
        never leading out of the tenant's. `since` starts the log at the `t` index."""
        tenant, keys = query.tenant_id, self._keys
        v1_begin, v1_end = keys.namespace_range(tenant, "audit")
        log_begin, log_end = keys.namespace_range(tenant, "log")
        skip: tuple[bytes, int] | None = None  # (piece key, events of it already read)
        if after is not None:
            if not isinstance(after, bytes):
                raise TypeError("fdb: a read cursor is a key (bytes)")
            if after >= log_end:
                return
            if after >= v1_end:
                v1_begin = v1_end
            if after >= log_begin:
                _, _, vs, p, index = keys.unpack(after)
                log_begin, skip = keys.log(tenant, vs, p), (keys.log(tenant, vs, p), index + 1)
            elif after >= v1_begin:
                v1_begin = after + b"\x00"
        session_begin = b""
        if query.since is not None and (since := self._since_version(tenant, query.since)) is not None:
            stamp = fdbtuple.Versionstamp(since)
            v1_begin = max(v1_begin, keys.key(tenant, "audit", stamp) + b"\xff")
            log_begin = max(log_begin, keys.key(tenant, "log", stamp) + b"\xff")
            if query.session_id is not None:
                session_begin = keys.session(tenant, query.session_id, stamp) + b"\xff"
        v1 = ((key, codec.decode_v1_event(tenant, value)) for key, value in self._v1_rows(tenant, v1_begin, v1_end))
        if query.session_id is None:
            yield from query.select(chain(v1, self._log_events(tenant, log_begin, log_end, skip)))
            return
        # v1 kept no session index: its (older) range is read and filtered; the log through the `s` index.
        v2 = self._session_events(tenant, query.session_id, session_begin, log_begin, skip)
        yield from query.select(chain(v1, v2))

    def _session_events(
        self, tenant: str, session: str, begin: bytes, log_begin: bytes, skip: tuple[bytes, int] | None
    ) -> Iterator[tuple[bytes, Event]]:
        """The log's pieces of the transactions that wrote events of `session`, from its `s` keys at or after
        `begin` (and pieces at or after `log_begin`): only those transactions are read. A transaction may hold
        events of other sessions too; the query filters them."""
        keys = self._keys
        s_begin, s_end = keys.namespace_range(tenant, "s", session)
        for key, _ in self._scan(tenant, max(s_begin, begin), s_end, PAGE_ROWS):
            lo, hi = keys.namespace_range(tenant, "log", keys.unpack(key)[3])
            if hi <= log_begin:
                continue
            yield from self._log_events(tenant, max(lo, log_begin), hi, skip)

    def _since_version(self, tenant: str, since: datetime) -> bytes | None:
        """The versionstamp of the last transaction committed (by its pod's clock) at least CLOCK_SKEW_S before
        `since`: an event's ts is at most its commit time, so no event at or after `since` is in it or before."""
        begin, _ = self._keys.namespace_range(tenant, "t")
        end = self._keys.time_index(tenant, int(since.timestamp()) - CLOCK_SKEW_S) + b"\xff"
        return self._run(partial(self._last_stamp, begin, end), tenant)

    def _last_stamp(self, begin: bytes, end: bytes, tr: Any) -> bytes | None:
        """The versionstamp held by the last `t` key in [begin, end): the last transaction committed there."""
        return next((bytes(kv.value[:VS_LEN]) for kv in tr.get_range(begin, end, limit=1, reverse=True)), None)

    def _log_events(
        self, tenant: str, begin: bytes, end: bytes, skip: tuple[bytes, int] | None = None
    ) -> Iterator[tuple[bytes, Event]]:
        for key, value in self._log_pieces(tenant, begin, end):
            start = skip[1] if skip is not None and key == skip[0] else 0
            events = codec.decode_piece(value).events
            yield from ((codec.cursor(key, i), events[i]) for i in range(start, len(events)))

    def _log_pieces(self, tenant: str, begin: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(piece key, whole value): a value over VALUE_MAX joined from its part keys, which sort just after
        it (a tuple's encoding is prefix-free, so only a piece's own parts start with its key)."""
        key, parts = b"", list[bytes]()
        for k, v in self._scan(tenant, begin, end, PAGE_PIECES):
            if key and k.startswith(key):
                parts.append(v)
                continue
            if key:
                yield key, b"".join(parts)
            key, parts = k, [v]
        if key:
            yield key, b"".join(parts)

    def _scan(self, tenant: str, begin: bytes, end: bytes, rows: int) -> Iterator[tuple[bytes, bytes]]:
        while begin < end:
            page = self._run(partial(self._read_page, begin, end, rows), tenant)
            yield from page
            if len(page) < rows:
                return
            begin = page[-1][0] + b"\x00"

    def _read_page(self, begin: bytes, end: bytes, rows: int, tr: Any) -> list[tuple[bytes, bytes]]:
        """One transaction per page keeps every read inside FoundationDB's 5-second window; `exact` asks for
        the page's rows in one batch."""
        return [
            (kv.key, kv.value) for kv in tr.get_range(begin, end, limit=rows, streaming_mode=fdb.StreamingMode.exact)
        ]

    def _v1_rows(self, tenant: str, begin: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
        """v1 `audit` rows, an event split across `audit_chunks` joined."""
        for key, value in self._scan(tenant, begin, end, PAGE_ROWS):
            if value == codec.CHUNKED:
                _, _, vs, n = self._keys.unpack(key)
                prefix = self._keys.audit_chunks(tenant, vs, n)
                value = b"".join(v for _, v in self._scan(tenant, prefix + b"\x00", prefix + b"\xff", PAGE_ROWS))
            yield key, value

    def registry(self, tenant_id: str) -> list[StreamEntry]:
        """The `streams` registry, oldest first (by the time each stream began)."""
        begin, end = self._keys.namespace_range(tenant_id, "streams")
        entries = [
            StreamEntry(self._keys.unpack(key)[2], *codec.decode_stream(value))
            for key, value in self._scan(tenant_id, begin, end, PAGE_ROWS)
        ]
        return sorted(entries, key=lambda entry: entry.first_ts)

    def user_trail(self, tenant_id: str, user_id: str, roots: Collection[str]) -> Iterator[Event]:
        """The user's streams from the registry (one range), then each stream's `c` range and the pieces its
        batches name, merged into commit order by cursor: none of another user's batches is read. What has no
        registered stream is read as before, filtered, only where it exists: layout v1's events, and batches
        without a header (their `ids` keys say so)."""
        keys = self._keys

        def stream(stream_id: str) -> Iterator[tuple[Cursor, Event]]:
            for batch in self.batches(tenant_id, stream_id, layouts=("c",)):
                yield from self.batch_events(tenant_id, batch)

        def present(namespace: str) -> bool:
            return (
                self._run(partial(self._first_key, *keys.namespace_range(tenant_id, namespace)), tenant_id) is not None
            )

        mine = [entry.stream_id for entry in self.registry(tenant_id) if entry.user_id == user_id]
        sources: list[Iterator[tuple[Cursor, Event]]] = [stream(stream_id) for stream_id in mine]
        if present("ids"):  # a batch without a header is in no stream: the log is read whole
            sources = [((c, e) for c, e in self._log_events(tenant_id, *keys.namespace_range(tenant_id, "log")))]
        if present("audit"):
            v1 = self._v1_rows(tenant_id, *keys.namespace_range(tenant_id, "audit"))
            sources.insert(0, ((key, codec.decode_v1_event(tenant_id, value)) for key, value in v1))
        for _, e in merge(*sources, key=lambda row: row[0]):
            if e.user_id == user_id and e.root in roots:
                yield e

    def streams(self, tenant_id: str) -> list[str]:
        """One read per stream and layout: from each stream's first key to the next stream's."""
        return sorted({stream for namespace in ("chain", "c") for stream in self._first_keys(tenant_id, namespace)})

    def _first_key(self, begin: bytes, end: bytes, tr: Any) -> bytes | None:
        return next((kv.key for kv in tr.get_range(begin, end, limit=1)), None)

    def batches(self, tenant_id: str, stream_id: str, layouts: Sequence[str] = ("chain", "c")) -> Iterator[StoredBatch]:
        """v1's headers and v2's complete batches, in number order (a stream begun in v1 goes on in v2);
        `layouts` leaves one out (`chain`: v1's, `c`: v2's)."""
        keys = self._keys

        def v1() -> Iterator[StoredBatch]:
            for key, value in self._scan(tenant_id, *keys.namespace_range(tenant_id, "chain", stream_id), PAGE_ROWS):
                header, where = codec.decode_v1_header(stream_id, keys.unpack(key)[3], value)
                yield StoredBatch(header, ("v1", where))

        def v2() -> Iterator[StoredBatch]:
            for key, value in self._scan(tenant_id, *keys.namespace_range(tenant_id, "c", stream_id), PAGE_ROWS):
                progress = codec.decode_progress(stream_id, keys.unpack(key)[3], value)
                if progress.complete:  # a batch still being written is not stored yet (its events in no batch)
                    yield StoredBatch(progress.header, ("v2", progress.runs))

        both = [v1() if "chain" in layouts else iter(()), v2() if "c" in layouts else iter(())]
        yield from merge(*both, key=lambda b: b.header.number)

    def batch_events(self, tenant_id: str, batch: StoredBatch) -> list[tuple[Cursor, Event]]:
        layout, runs = batch.where
        found: list[tuple[Cursor, Event]] = []
        for version, first, count in runs:
            vs = fdbtuple.Versionstamp(version)
            if layout == "v1":
                begin, end = self._keys.audit(tenant_id, vs, first), self._keys.audit(tenant_id, vs, first + count)
                found += [(k, codec.decode_v1_event(tenant_id, v)) for k, v in self._v1_rows(tenant_id, begin, end)]
                continue
            begin, end = self._keys.log(tenant_id, vs, first), self._keys.log(tenant_id, vs, first + count)
            found += self._log_events(tenant_id, begin, end)
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

    # Retention (docs/retention.md) ---------------------------------------------------------------

    def horizons(self, tenant_id: str) -> dict[str, Horizon]:
        rows = self._scan(tenant_id, *self._keys.namespace_range(tenant_id, "h"), PAGE_ROWS)
        return {self._keys.unpack(k)[2]: Horizon(*codec.decode_horizon(v)) for k, v in rows}

    def retention_plan(self, tenant_id: str, before: datetime) -> RetentionPlan:
        """The bound is a versionstamp: that of the last transaction committed (by the `t` index) before
        `before`, or the first of a batch that cannot go (journaled after `before`, or still being written),
        whichever comes first. Layout v1's keys go only when all of them are older than `before`."""
        keys, cut = self._keys, rfc3339(before.timestamp())
        horizons = self.horizons(tenant_id)
        t_begin, _ = keys.namespace_range(tenant_id, "t")
        t_end = keys.time_index(tenant_id, math.floor(before.timestamp()))
        last_vs = self._run(partial(self._last_stamp, t_begin, t_end), tenant_id)
        upper = bytes(VS_LEN) if last_vs is None else (int.from_bytes(last_vs) + 1).to_bytes(VS_LEN)
        streams = {
            stream: self._stream_batches(tenant_id, stream, horizons.get(stream)) for stream in self.streams(tenant_id)
        }
        legacy = all(h.ts < cut for rows in streams.values() for h, versions, _ in rows if versions is None)
        legacy = legacy and self._v1_older(tenant_id, cut)

        def going(row: tuple[BatchHeader, list[bytes] | None, bool]) -> bool:
            header, versions, complete = row
            if versions is None:
                return legacy
            return complete and header.ts < cut and all(v < upper for v in versions)

        while True:  # a batch that stays keeps its pieces and all committed after them: to a fixed point
            staying = [v for rows in streams.values() for row in rows if not going(row) for v in row[1] or []]
            if min(staying, default=upper) >= upper:
                break
            upper = min(staying)
        pruned: dict[str, PrunedStream] = {}
        for stream, rows in streams.items():
            gone = list(takewhile(going, rows))
            if gone:
                h = gone[-1][0]
                previous = horizons.get(stream)
                pruned[stream] = PrunedStream(
                    previous, Horizon(h.number, h.link, h.ts), len(gone), sum(row[0].events for row in gone)
                )
        return RetentionPlan(tenant_id, before, pruned, upper, legacy=legacy)

    def _stream_batches(
        self, tenant: str, stream: str, horizon: Horizon | None
    ) -> list[tuple[BatchHeader, list[bytes] | None, bool]]:
        """(header, its pieces' versions or None for a v1 batch, complete) of each batch after the horizon,
        in number order: v2's batches still being written too (their pieces must stay)."""
        keys, after = self._keys, horizon.number if horizon is not None else 0
        rows: list[tuple[BatchHeader, list[bytes] | None, bool]] = []
        for key, value in self._scan(tenant, *keys.namespace_range(tenant, "chain", stream), PAGE_ROWS):
            rows.append((codec.decode_v1_header(stream, keys.unpack(key)[3], value)[0], None, True))
        for key, value in self._scan(tenant, *keys.namespace_range(tenant, "c", stream), PAGE_ROWS):
            progress = codec.decode_progress(stream, keys.unpack(key)[3], value)
            rows.append((progress.header, [bytes(v) for v, _, _ in progress.runs], progress.complete))
        return sorted((row for row in rows if row[0].number > after), key=lambda row: row[0].number)

    def _v1_older(self, tenant: str, cut: str) -> bool:
        """Whether v1's last event (in commit order) is older than the cut: v1 has no time index."""
        begin, end = self._keys.namespace_range(tenant, "audit")

        def last(tr: Any) -> bytes | None:
            return next((kv.key for kv in tr.get_range(begin, end, limit=1, reverse=True)), None)

        key = self._run(last, tenant)
        if key is None:
            return True
        _, value = next(self._v1_rows(tenant, key, end))
        return codec.decode_v1_event(tenant, value).ts < cut

    def _log_bound(self, tenant: str, plan: RetentionPlan) -> bytes:
        return self._keys.key(tenant, "log", fdbtuple.Versionstamp(plan.bound))

    def unchained_before(self, plan: RetentionPlan) -> Iterator[Event]:
        """Pieces of batches without a header before the bound (their values decoded only then), and with
        layout v1 going, its events in no batch's runs."""
        tenant, keys = plan.tenant_id, self._keys
        if plan.legacy:
            runs: dict[bytes, list[tuple[int, int]]] = {}
            for stream in self.streams(tenant):
                for key, value in self._scan(tenant, *keys.namespace_range(tenant, "chain", stream), PAGE_ROWS):
                    for version, first, count in codec.decode_v1_header(stream, keys.unpack(key)[3], value)[1]:
                        runs.setdefault(bytes(version), []).append((first, count))
            for key, value in self._v1_rows(tenant, *keys.namespace_range(tenant, "audit")):
                _, _, vs, n = keys.unpack(key)
                if not any(first <= n < first + count for first, count in runs.get(bytes(vs.tr_version), [])):
                    yield codec.decode_v1_event(tenant, value)
        begin, _ = keys.namespace_range(tenant, "log")
        for _, value in self._log_pieces(tenant, begin, self._log_bound(tenant, plan)):
            if codec.piece_stream(value) is None:
                yield from codec.decode_piece(value).events

    def prune(self, plan: RetentionPlan) -> None:
        """Horizons first (never moved back), then the log by the `t` index's versionstamps, a page of it per
        transaction, and the `t`, `s`, `c` and `ids` keys the horizons cover, then v1's keys if they all go.
        Clears only: no key is read but the index and one per stream or session."""
        tenant, keys = plan.tenant_id, self._keys
        for chunk in _chunks(plan.streams.items()):

            def set_horizons(tr: Any, chunk: list[tuple[str, PrunedStream]] = chunk) -> None:
                stored = [(stream, p.horizon, tr.get(keys.horizon(tenant, stream))) for stream, p in chunk]
                for stream, h, future in stored:
                    if future.value is None or codec.decode_horizon(future.value)[0] < h.number:
                        tr.set(keys.horizon(tenant, stream), codec.encode_horizon(h.number, h.link, h.ts))

            self._run(set_horizons, tenant, write=True)
        bound = self._log_bound(tenant, plan)
        low, _ = keys.namespace_range(tenant, "log")
        t_begin, _ = keys.namespace_range(tenant, "t")
        t_end = keys.time_index(tenant, math.floor(plan.before.timestamp()))
        for page in _chunks(self._scan(tenant, t_begin, t_end, PAGE_ROWS), PAGE_ROWS):
            stamps = [(k, bytes(v[:VS_LEN])) for k, v in page if bytes(v[:VS_LEN]) < plan.bound]
            last = max((vs for _, vs in stamps), default=bytes(VS_LEN))
            high = max(low, min(bound, keys.key(tenant, "log", fdbtuple.Versionstamp(last)) + b"\xff"))
            self._run(partial(self._clear_log, low, high, [k for k, _ in stamps]), tenant, write=True)
            low = high
        self._run(partial(self._clear_log, low, bound, []), tenant, write=True)  # pieces no `t` key names
        for chunk_s in _chunks(self._first_keys(tenant, "s")):

            def clear_sessions(tr: Any, chunk: list[str] = chunk_s) -> None:
                for session in chunk:
                    begin, _ = keys.namespace_range(tenant, "s", session)
                    tr.clear_range(begin, keys.session(tenant, session, fdbtuple.Versionstamp(plan.bound)))

            self._run(clear_sessions, tenant, write=True)
        for chunk_h in _chunks(self.horizons(tenant).items()):

            def clear_batches(tr: Any, chunk: list[tuple[str, Horizon]] = chunk_h) -> None:
                for stream, h in chunk:
                    begin, _ = keys.namespace_range(tenant, "c", stream)
                    tr.clear_range(begin, keys.progress(tenant, stream, h.number + 1))

            self._run(clear_batches, tenant, write=True)
        ms = math.floor(plan.before.timestamp() * 1000)
        ids_end = keys.event_id(tenant, f"{ms:012x}"[:8] + "-" + f"{ms:012x}"[8:])

        def clear_old(tr: Any) -> None:
            tr.clear_range(keys.namespace_range(tenant, "ids")[0], ids_end)
            for namespace in V1_NAMESPACES if plan.legacy else ():
                tr.clear_range(*keys.namespace_range(tenant, namespace))

        self._run(clear_old, tenant, write=True)

    def _clear_log(self, begin: bytes, end: bytes, stamps: list[bytes], tr: Any) -> None:
        if begin < end:
            tr.clear_range(begin, end)
        for key in stamps:
            tr.clear(key)

    def _first_keys(self, tenant: str, namespace: str) -> list[str]:
        """The distinct first elements under a namespace (sessions, streams): one read each."""
        found: list[str] = []
        begin, end = self._keys.namespace_range(tenant, namespace)
        while key := self._run(partial(self._first_key, begin, end), tenant):
            found.append(self._keys.unpack(key)[2])
            begin = self._keys.key(tenant, namespace, found[-1]) + b"\xff"
        return found

    def delete_tenant(self, tenant_id: str) -> None:
        """The tenant's whole prefix, every layout, in one clear."""
        prefix = self._keys.key(tenant_id)
        self._run(lambda tr: tr.clear_range(prefix, prefix + b"\xff"), tenant_id, write=True)


def _chunks(items: Iterable[T], size: int = CLEARS_PER_TX) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
