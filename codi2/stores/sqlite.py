"""SQLite sink: the embedded default for development and single-node use.

WAL mode and `synchronous=FULL`: a batch the sink acknowledged survives a power cut. One transaction per
batch; `INSERT OR IGNORE` on the event id makes a replayed batch land once. `pos` is the commit order.
`body` is the event's compact record (`codi2.trail.events.encode_event`); rows written by 0.1 hold JSON text
and read back the same.

The daemon keeps its journal in this same file, so an event is committed to the store in the very
transaction that journals it (`insert`): one durable write per batch, and nothing to ship.

`batches` holds each chained batch's header (docs/trail-format.md), inserted with its events: the batch's
events are the rows `first_pos`…`last_pos` of `events`, the rows that transaction added. `horizons` holds
each pruned stream's last pruned batch (docs/retention.md).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator
from contextlib import closing
from datetime import datetime
from itertools import takewhile
from pathlib import Path
from typing import Any

import structlog

from codi2.schema import BUSY_TIMEOUT_S, Schema, SchemaTooNew, execute_script
from codi2.stores.base import Cursor, Horizon, PrunedStream, RetentionPlan, StoredBatch, StoreError, StreamEntry
from codi2.trail.chain import ZERO
from codi2.trail.events import Batch, BatchHeader, Event, EventQuery, decode_event, encode_event, rfc3339


def _adopt(db: sqlite3.Connection) -> None:
    """Version 1: the tables as releases before user_version left them (0.1's included), created where
    missing."""
    execute_script(
        db,
        """
        CREATE TABLE IF NOT EXISTS events (
            pos       INTEGER PRIMARY KEY AUTOINCREMENT,
            id        TEXT NOT NULL UNIQUE,
            batch_id  TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            ts        TEXT NOT NULL,
            action    TEXT NOT NULL,
            path      BLOB NOT NULL,
            body      BLOB NOT NULL
        );
        CREATE INDEX IF NOT EXISTS events_tenant_pos ON events (tenant_id, pos);
        CREATE INDEX IF NOT EXISTS events_tenant_ts ON events (tenant_id, ts);
        DROP INDEX IF EXISTS events_tenant_path;
        CREATE TABLE IF NOT EXISTS batches (
            tenant_id TEXT NOT NULL,
            stream_id TEXT NOT NULL,
            number    INTEGER NOT NULL,
            ts        TEXT NOT NULL,
            prev      BLOB NOT NULL,
            link      BLOB NOT NULL,
            key_id    TEXT,
            events    INTEGER NOT NULL,
            first_pos INTEGER NOT NULL,
            last_pos  INTEGER NOT NULL,
            PRIMARY KEY (tenant_id, stream_id, number)
        ) WITHOUT ROWID;
        """,
    )


def _add_horizons(db: sqlite3.Connection) -> None:
    """Version 2: each pruned stream's horizon (`codi2 prune`)."""
    db.execute(
        """
        CREATE TABLE horizons (
            tenant_id TEXT NOT NULL,
            stream_id TEXT NOT NULL,
            number    INTEGER NOT NULL,
            link      BLOB NOT NULL,
            ts        TEXT NOT NULL,
            PRIMARY KEY (tenant_id, stream_id)
        ) WITHOUT ROWID
        """
    )


BACKFILL_ROWS = 10_000  # rows decoded per statement by the one-time backfills


def _session_column(db: sqlite3.Connection) -> None:
    """Version 3: each event's session as a column with an index, for `events --session`; the record body
    keeps it too (and stays what is read), so the column only finds rows. Old rows are filled in once here."""
    db.execute("ALTER TABLE events ADD COLUMN session_id TEXT")
    db.execute("CREATE INDEX events_tenant_session ON events (tenant_id, session_id, pos)")
    after = 0
    while rows := db.execute(
        "SELECT pos, body FROM events WHERE pos > ? ORDER BY pos LIMIT ?", (after, BACKFILL_ROWS)
    ).fetchall():
        db.executemany(
            "UPDATE events SET session_id = ? WHERE pos = ?", [(_decode(body).session_id, pos) for pos, body in rows]
        )
        after = rows[-1][0]


def _streams_table(db: sqlite3.Connection) -> None:
    """Version 4: the streams registry (docs/trail-format.md): whose each stream is, and the head of the stream
    it follows (its user's and pod's previous one, as found when its first batch was stored), so a stream lost
    whole is seen by `verify`. Streams stored before it are registered from their first batch, with no
    predecessor (none was recorded)."""
    db.execute(
        """
        CREATE TABLE streams (
            tenant_id   TEXT NOT NULL,
            stream_id   TEXT NOT NULL,
            user_id     TEXT NOT NULL,
            pod         TEXT NOT NULL,
            first_ts    TEXT NOT NULL,
            pred_stream TEXT,
            pred_number INTEGER,
            pred_link   BLOB,
            UNIQUE (tenant_id, stream_id)
        )
        """
    )
    db.execute("CREATE INDEX streams_owner ON streams (tenant_id, user_id, pod)")
    firsts = db.execute(
        "SELECT b.tenant_id, b.stream_id, b.ts, e.body FROM batches AS b JOIN events AS e ON e.pos = b.first_pos"
        " WHERE b.number = (SELECT min(number) FROM batches WHERE tenant_id = b.tenant_id AND stream_id = b.stream_id)"
        " ORDER BY b.first_pos"
    ).fetchall()
    for tenant, stream, ts, body in firsts:
        e = _decode(body)
        db.execute(
            "INSERT OR IGNORE INTO streams (tenant_id, stream_id, user_id, pod, first_ts) VALUES (?, ?, ?, ?, ?)",
            (tenant, stream, e.user_id, e.pod, ts),
        )


# The high half of user_version: the low half is the journal's, which shares this file in the daemon.
SCHEMA = Schema("store", 16, [_adopt, _add_horizons, _session_column, _streams_table])
HEADER_COLUMNS = "number, ts, prev, link, key_id, events, first_pos, last_pos"
log = structlog.get_logger("codi2.stores.sqlite")


def _last_pos(db: sqlite3.Connection) -> int:
    pos: int = db.execute("SELECT coalesce(max(pos), 0) FROM events").fetchone()[0]
    return pos


def insert(db: sqlite3.Connection, batch: Batch, bodies: list[bytes] | None = None) -> None:
    """Add a batch's events (encoded as `bodies`, or here) and its header inside the caller's transaction,
    idempotent on event id and on the header's place in its stream."""
    if bodies is None:
        bodies = [encode_event(e) for e in batch.events]
    h = batch.header
    first = _last_pos(db) + 1 if h is not None else 0
    db.executemany(
        "INSERT OR IGNORE INTO events (id, batch_id, tenant_id, ts, action, path, body, session_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (e.id, batch.batch_id, e.tenant_id, e.ts, e.action, os.fsencode(e.path), body, e.session_id)
            for e, body in zip(batch.events, bodies, strict=True)
        ],
    )
    if h is not None:
        tenant, last = batch.events[0].tenant_id, _last_pos(db)
        _register(db, tenant, batch.events[0], h)
        db.execute(
            "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (tenant, h.stream_id, h.number, h.ts, h.prev, h.link, h.key_id, h.events, first, last),
        )


def _register(db: sqlite3.Connection, tenant: str, first: Event, h: BatchHeader) -> None:
    """With a stream's first batch stored, its registry entry: whose it is, and the head of the stream of the
    same user and pod registered before it (the stream it succeeds; its horizon when pruned whole), so that
    stream cannot vanish unseen."""
    if db.execute("SELECT 1 FROM streams WHERE tenant_id = ? AND stream_id = ?", (tenant, h.stream_id)).fetchone():
        return
    head: tuple[Any, ...] = (None, None, None)
    row = db.execute(
        "SELECT stream_id FROM streams WHERE tenant_id = ? AND user_id = ? AND pod = ? ORDER BY rowid DESC LIMIT 1",
        (tenant, first.user_id, first.pod),
    ).fetchone()
    if row is not None:
        last = db.execute(
            "SELECT number, link FROM batches WHERE tenant_id = ? AND stream_id = ? ORDER BY number DESC LIMIT 1",
            (tenant, row[0]),
        ).fetchone()
        if last is None:  # pruned whole: its horizon is its head
            sql = "SELECT number, link FROM horizons WHERE tenant_id = ? AND stream_id = ?"
            last = db.execute(sql, (tenant, row[0])).fetchone()
        head = (row[0], *(last or (0, ZERO)))
    db.execute(
        "INSERT INTO streams VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (tenant, h.stream_id, first.user_id, first.pod, h.ts, *head),
    )


class LocalStore:
    """This store as the daemon's journal keeps it, in the journal's own file and transactions (the journal
    migrates this schema with its own, at start-up)."""

    schema = SCHEMA
    insert = staticmethod(insert)

    @staticmethod
    def salvage(damaged: Path, db: sqlite3.Connection) -> int:
        """Copy every event row a damaged file still yields, in commit order, into `db`; stop at the first
        unreadable page (what follows it is counted by the gap the caller records). Then the chain's
        headers, pointing at where their events are now: a batch that lost events shows it to a verifier."""
        kept = 0
        moved: dict[int, int] = {}  # an event's pos in the damaged file → in `db`
        try:
            old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
        except sqlite3.Error:
            return 0
        try:
            rows = old.execute("SELECT pos, id, batch_id, tenant_id, ts, action, path, body FROM events ORDER BY pos")
            for pos, *row in rows:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO events (id, batch_id, tenant_id, ts, action, path, body, session_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (*row, _session_of(row[-1])),
                )
                if cursor.rowcount and cursor.lastrowid is not None:
                    moved[pos] = cursor.lastrowid
                kept += 1
        except sqlite3.Error as exc:
            log.error("store_salvage_stopped", kept=kept, error=str(exc))
        try:
            for *header, first, last in old.execute("SELECT * FROM batches").fetchall():
                now = [moved[pos] for pos in range(first, last + 1) if pos in moved]
                if now:
                    db.execute(
                        "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*header, now[0], now[-1]),
                    )
        except sqlite3.Error as exc:
            log.error("store_salvage_stopped", table="batches", error=str(exc))
        try:  # a horizon lost would make the first live batch of its stream look cut off
            if old.execute("SELECT 1 FROM sqlite_master WHERE name = 'horizons'").fetchone() is not None:
                db.executemany(
                    "INSERT OR IGNORE INTO horizons VALUES (?, ?, ?, ?, ?)", old.execute("SELECT * FROM horizons")
                )
        except sqlite3.Error as exc:
            log.error("store_salvage_stopped", table="horizons", error=str(exc))
        try:
            for row in old.execute("SELECT * FROM streams ORDER BY rowid").fetchall():
                db.execute("INSERT OR IGNORE INTO streams VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
        except sqlite3.Error as exc:  # a file from before the registry has none: the streams go unregistered
            log.error("store_salvage_stopped", table="streams", error=str(exc))
        finally:
            old.close()
        return kept


def _decode(body: str | bytes) -> Event:
    return Event.from_json(body) if isinstance(body, str) else decode_event(body)


def _session_of(body: str | bytes) -> str | None:
    """The session of a salvaged row, for its column; a record that no longer decodes keeps none."""
    try:
        return _decode(body).session_id
    except (ValueError, TypeError):
        return None


def _error(exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    return StoreError(f"sqlite: {exc}", code=code)


class SqliteSink:
    name = "sqlite"

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """Check the schema, migrating it only when it is behind (a write); the write connection is opened
        by the first write. So the daemon's sink, on the file its journal owns (and migrated at start-up),
        never writes it: it only reads the trail for an index rebuild."""
        self.path = path
        if not create and not path.exists():
            raise StoreError(f"sqlite: no audit store at {path}", code="not_found")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        try:
            with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as db:
                if not SCHEMA.current(db):
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("BEGIN IMMEDIATE")
                    SCHEMA.migrate(db)
                    db.execute("COMMIT")
        except SchemaTooNew as exc:
            raise StoreError(f"sqlite: {path}: {exc}", code="schema_too_new", retryable=False) from exc
        except sqlite3.Error as exc:
            raise _error(exc) from exc

    def _db(self) -> sqlite3.Connection:
        """The write connection (under `_lock`), opened on first use."""
        if self._writer is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error:
                db.close()
                raise
            self._writer = db
        return self._writer

    def write_batch(self, batch: Batch) -> None:
        with self._lock:
            try:
                db = self._db()
                db.execute("BEGIN IMMEDIATE")
                try:
                    insert(db, batch)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _error(exc) from exc

    def read(self, query: EventQuery, after: Cursor | None = None) -> Iterator[tuple[Cursor, Event]]:
        # `action` is left to `matches`, on the record itself: no index serves it, and a row whose column was
        # edited must not drop out of a filtered read. `tenant_id`, `ts` and `session_id` are indexed:
        # `codi2 verify` finds a row hidden by editing the first two (every event of a batch must be in the
        # trail read; it reads no session). A first read `--since` goes by the time index (the planner,
        # without statistics, would take the commit order's and read the tenant); a session by its own.
        index = ""
        if query.session_id is not None:
            index = " INDEXED BY events_tenant_session"
        elif query.since is not None and not after:
            index = " INDEXED BY events_tenant_ts"
        sql = f"SELECT pos, body FROM events{index} WHERE tenant_id = ? AND pos > ?"
        args: list[object] = [query.tenant_id, int(after or 0)]
        if query.session_id is not None:
            sql += " AND session_id = ?"
            args.append(query.session_id)
        if query.since is not None:
            sql += " AND ts >= ?"
            args.append(rfc3339(query.since.timestamp()))
        if query.until is not None:
            sql += " AND ts <= ?"
            args.append(rfc3339(query.until.timestamp()))
        sql += " ORDER BY pos"
        yield from query.select((pos, _decode(body)) for pos, body in self._query(sql, args))

    def _query(self, sql: str, args: list[object]) -> Iterator[tuple[Any, ...]]:
        """Rows from a connection of its own, so a long or followed read never holds the writer's lock."""
        try:
            with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)) as reader:
                yield from reader.execute(sql, args)
        except sqlite3.Error as exc:
            raise _error(exc) from exc

    def registry(self, tenant_id: str) -> list[StreamEntry]:
        sql = "SELECT * FROM streams WHERE tenant_id = ? ORDER BY rowid"
        return [
            StreamEntry(stream, user, pod, first_ts, None if pred is None else (pred, number, link))
            for _, stream, user, pod, first_ts, pred, number, link in self._query(sql, [tenant_id])
        ]

    def user_trail(self, tenant_id: str, user_id: str, roots: Collection[str]) -> Iterator[Event]:
        """The tenant's rows, filtered: the file is local, and rows of batches without a header (0.1's) belong
        to no registered stream."""
        for _, e in self.read(EventQuery(tenant_id)):
            if e.user_id == user_id and e.root in roots:
                yield e

    def streams(self, tenant_id: str) -> list[str]:
        sql = "SELECT DISTINCT stream_id FROM batches WHERE tenant_id = ? ORDER BY stream_id"
        return [stream for (stream,) in self._query(sql, [tenant_id])]

    def batches(self, tenant_id: str, stream_id: str) -> Iterator[StoredBatch]:
        sql = f"SELECT {HEADER_COLUMNS} FROM batches WHERE tenant_id = ? AND stream_id = ? ORDER BY number"
        for number, ts, prev, link, key_id, events, first, last in self._query(sql, [tenant_id, stream_id]):
            yield StoredBatch(BatchHeader(stream_id, number, ts, prev, link, key_id, events), (first, last))

    def batch_events(self, tenant_id: str, batch: StoredBatch) -> list[tuple[Cursor, Event]]:
        sql = "SELECT pos, body FROM events WHERE pos BETWEEN ? AND ? ORDER BY pos"
        return [(pos, _decode(body)) for pos, body in self._query(sql, list(batch.where))]

    def draining_backlog(self, draining: bool) -> None:
        """Nothing to do: a SQLite file has no other tenant's traffic to yield to."""

    def ping(self) -> None:
        with self._lock:
            try:
                db = self._db()
                db.execute("BEGIN IMMEDIATE")
                db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise _error(exc) from exc

    def probe(self, tenant_id: str) -> None:
        """Write, read back and clear a probe row in one transaction that is rolled back."""
        token = os.urandom(16).hex()
        with self._lock:
            try:
                db = self._db()
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("CREATE TEMP TABLE IF NOT EXISTS probe (tenant_id TEXT, token TEXT)")
                    db.execute("INSERT INTO probe VALUES (?, ?)", (tenant_id, token))
                    row = db.execute("SELECT token FROM probe WHERE tenant_id = ?", (tenant_id,)).fetchone()
                    db.execute("DELETE FROM probe WHERE tenant_id = ?", (tenant_id,))
                finally:
                    db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise _error(exc) from exc
        if row is None or row[0] != token:
            raise StoreError("sqlite: probe row read back wrong", code="probe_mismatch")

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    # Retention (docs/retention.md) ---------------------------------------------------------------

    def _reading(self) -> contextlib.closing[sqlite3.Connection]:
        """A connection of its own in one read transaction: a plan is read from one snapshot."""
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise _error(exc) from exc
        return closing(db)

    def horizons(self, tenant_id: str) -> dict[str, Horizon]:
        with self._reading() as db:
            return read_horizons(db, tenant_id)

    def retention_plan(self, tenant_id: str, before: datetime) -> RetentionPlan:
        with self._reading() as db:
            try:
                return plan(db, tenant_id, before)
            except sqlite3.Error as exc:
                raise _error(exc) from exc

    def unchained_before(self, plan: RetentionPlan) -> Iterator[Event]:
        with self._reading() as db:
            try:
                yield from unchained_before(db, plan)
            except sqlite3.Error as exc:
                raise _error(exc) from exc

    def prune(self, plan: RetentionPlan) -> None:
        with self._lock:
            try:
                prune(self._db(), plan)
            except sqlite3.Error as exc:
                raise _error(exc) from exc

    def delete_tenant(self, tenant_id: str) -> None:
        with self._lock:
            try:
                delete_tenant(self._db(), tenant_id)
            except sqlite3.Error as exc:
                raise _error(exc) from exc


# Retention, on a connection: the CLI's (SqliteSink) or, in the daemon, one the journal thread opens --------

PRUNE_ROWS = 10_000  # events deleted per transaction, so the journal thread never waits long behind a prune


@contextlib.contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def read_horizons(db: sqlite3.Connection, tenant_id: str) -> dict[str, Horizon]:
    rows = db.execute("SELECT stream_id, number, link, ts FROM horizons WHERE tenant_id = ?", (tenant_id,))
    return {stream: Horizon(number, link, ts) for stream, number, link, ts in rows}


def plan(db: sqlite3.Connection, tenant_id: str, before: datetime) -> RetentionPlan:
    """The bound is the first row at or after `before`, or of a batch that cannot go (journaled after
    `before`), whichever comes first; each stream's horizon is its last batch wholly before the bound."""
    cut = rfc3339(before.timestamp())
    horizons = read_horizons(db, tenant_id)
    (bound,) = db.execute("SELECT min(pos) FROM events WHERE tenant_id = ? AND ts >= ?", (tenant_id, cut)).fetchone()
    bound = _last_pos(db) + 1 if bound is None else bound
    streams: dict[str, list[tuple[Any, ...]]] = {}
    sql = "SELECT stream_id, number, ts, link, events, first_pos, last_pos FROM batches WHERE tenant_id = ?"
    for row in db.execute(sql + " ORDER BY stream_id, number", (tenant_id,)):
        if row[1] > (horizons[row[0]].number if row[0] in horizons else 0):
            streams.setdefault(row[0], []).append(row)
    for rows in streams.values():  # a batch journaled after the cut keeps what follows it in commit order
        late = next((first for _, _, ts, _, _, first, _ in rows if ts >= cut), None)
        bound = bound if late is None else min(bound, late)
    pruned: dict[str, PrunedStream] = {}
    for stream, rows in streams.items():
        going = list(takewhile(lambda r: r[2] < cut and r[6] < bound, rows))
        if going:
            _, number, ts, link, *_ = going[-1]
            pruned[stream] = PrunedStream(
                horizons.get(stream), Horizon(number, link, ts), len(going), sum(r[4] for r in going)
            )
    return RetentionPlan(tenant_id, before, pruned, bound)


def unchained_before(db: sqlite3.Connection, plan: RetentionPlan) -> Iterator[Event]:
    """Rows before the bound in no batch's range: a sweep of both in position order."""
    ranges = db.execute(
        "SELECT first_pos, last_pos FROM batches WHERE tenant_id = ? AND first_pos < ? ORDER BY first_pos",
        (plan.tenant_id, plan.bound),
    ).fetchall()
    sql = "SELECT pos, body FROM events WHERE tenant_id = ? AND pos < ? ORDER BY pos"
    i = 0
    for pos, body in db.execute(sql, (plan.tenant_id, plan.bound)):
        while i < len(ranges) and ranges[i][1] < pos:
            i += 1
        if i == len(ranges) or pos < ranges[i][0]:
            yield _decode(body)


def prune(db: sqlite3.Connection, plan: RetentionPlan) -> None:
    """Horizons first (a horizon never moves back), then the rows before the bound, PRUNE_ROWS at a time,
    then the headers at or below each horizon (an interrupted prune's leftovers too)."""
    tenant = plan.tenant_id
    with _write(db):
        for stream, p in plan.streams.items():
            h = p.horizon
            db.execute(
                "INSERT INTO horizons VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant_id, stream_id) DO UPDATE SET"
                " number = excluded.number, link = excluded.link, ts = excluded.ts WHERE excluded.number > number",
                (tenant, stream, h.number, h.link, h.ts),
            )
    _delete_events(db, tenant, plan.bound)
    with _write(db):
        for stream, h in read_horizons(db, tenant).items():
            db.execute(
                "DELETE FROM batches WHERE tenant_id = ? AND stream_id = ? AND number <= ?", (tenant, stream, h.number)
            )


def _delete_events(db: sqlite3.Connection, tenant_id: str, bound: int | None) -> None:
    sql = "DELETE FROM events WHERE pos IN (SELECT pos FROM events WHERE tenant_id = ?"
    args: list[object] = [tenant_id]
    if bound is not None:
        sql += " AND pos < ?"
        args.append(bound)
    while True:
        with _write(db):
            gone = db.execute(sql + " ORDER BY pos LIMIT ?)", (*args, PRUNE_ROWS)).rowcount
        if gone < PRUNE_ROWS:
            return


def delete_tenant(db: sqlite3.Connection, tenant_id: str) -> None:
    _delete_events(db, tenant_id, None)
    with _write(db):
        db.execute("DELETE FROM batches WHERE tenant_id = ?", (tenant_id,))
        db.execute("DELETE FROM horizons WHERE tenant_id = ?", (tenant_id,))
        db.execute("DELETE FROM streams WHERE tenant_id = ?", (tenant_id,))


def prune_file(path: Path, tenant_id: str, before: datetime) -> RetentionPlan:
    """The daemon's retention, on the journal thread (the file's one writer): a connection of its own, closed
    when done."""
    with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as db:
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN")
        made = plan(db, tenant_id, before)
        db.execute("COMMIT")
        prune(db, made)
    return made
