"""The local journal: one SQLite file holding the file-state index and the outbox of unshipped batches.

`<state dir>/journal.db`, WAL mode. A flush reconciles changes against the index and appends the batch
it produced in **one transaction**: the index and the trail can never disagree, whatever fails (a full
disk rolls both back, a kill loses neither half alone). The shipper reads the outbox in order with its
own connection and deletes what the store has committed.

Tables:
- `files`: every entry the trail says exists, with the stat facts and sha256 last seen. The key is the
  path relative to its root with `/` written as `\\x00`, so key order is depth-first order (a directory,
  then everything below it, then its next sibling) and a subtree is one key range.
- `outbox`: batches not yet acknowledged by the store, in commit order; `body` holds the events'
  compact records (`codi2.trail.events.encode_events`), each versioned so any later release reads it, and
  `header` the batch's place in the hash chain (`codi2.trail.chain.encode_header`).
- `meta`: format version, stream id, the next event sequence number, the chain's head (`chain_batches`,
  `chain_head`), and `needs_rebuild` when the index may be ahead of the trail (a lost record) and must be
  derived again from the store.

Every batch is sealed into its stream's hash chain (`codi2.trail.chain`) by `append`, in the transaction that
makes it durable: a batch replayed after a crash carries the same link, and the head moves only when the
batch is committed.

A corrupt journal never stops the daemon: it is moved aside, whatever outbox rows still check out are
carried over, and the index is rebuilt (see `codi2.pipeline.pipeline`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog

from codi2.disk.fs import Facts
from codi2.trail import chain
from codi2.trail.chain import ChainHead, ChainKey
from codi2.trail.events import Batch, BatchHeader, Event, decode_events, encode_event, now_rfc3339, uuid7

log = structlog.get_logger("codi2.journal.journal")

FORMAT_VERSION = 1
FILE_NAME = "journal.db"
BUSY_TIMEOUT_S = 2.0  # another writer on the file (a tool, a reader's lock): fail, report, retry
LOOKUP_CHUNK = 500  # host parameters per IN (...) query
CACHE_KIB = 8192  # SQLite's page cache: a burst's batches touch index pages all over the file

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roots (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS files (
    root     INTEGER NOT NULL,
    key      BLOB NOT NULL,
    type     TEXT NOT NULL,
    size     INTEGER,
    mode     INTEGER,
    mtime_ns INTEGER,
    ctime_ns INTEGER,
    ino      INTEGER,
    dev      INTEGER,
    nlink    INTEGER,
    sha256   TEXT,
    PRIMARY KEY (root, key)
) WITHOUT ROWID;
DROP INDEX IF EXISTS files_links;
CREATE INDEX IF NOT EXISTS files_inode ON files (dev, ino);
CREATE TABLE IF NOT EXISTS outbox (
    n        INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    events   INTEGER NOT NULL,
    crc      INTEGER NOT NULL,
    body     BLOB NOT NULL,
    header   BLOB
);
"""
FACT_COLUMNS = "type, size, mode, mtime_ns, ctime_ns, ino, dev, nlink, sha256"
CORRUPT_MARKERS = ("malformed", "not a database", "file is encrypted", "disk image")


class LocalStore(Protocol):
    """A store that lives in the journal's own file (SQLite): its tables, and how a batch goes in."""

    schema: str

    def insert(self, db: sqlite3.Connection, batch: Batch, bodies: list[bytes]) -> None:
        """Add the batch (its events encoded as `bodies`) inside the caller's transaction."""

    def salvage(self, damaged: Path, db: sqlite3.Connection) -> int: ...


class JournalCorrupt(Exception):
    """The journal file cannot be trusted; the caller moves it aside and rebuilds."""


class JournalUnavailable(Exception):
    """The journal file cannot be opened for a reason other than its content (permissions, a lock held by
    another process, an I/O error, a file that is another program's database): nothing in it is known to be
    wrong, so nothing is moved aside (with SQLite the file is the store, the whole trail); the daemon stops."""


def is_corruption(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(m in str(exc).lower() for m in CORRUPT_MARKERS)


def key_of(rel: bytes) -> bytes:
    return rel.replace(b"/", b"\x00")


def rel_of(key: bytes) -> bytes:
    return key.replace(b"\x00", b"/")


def subtree_bounds(key: bytes) -> tuple[bytes, bytes]:
    """Keys strictly below `key` lie in [low, high); the whole root for b"". No file name reaches 4096 bytes
    (PATH_MAX bounds what a system call takes), so every key is below 4096 bytes of 0xff: a name of eight or more
    0xff bytes (eight was the bound) is a name like any other."""
    if not key:
        return b"", b"\xff" * 4096
    return key + b"\x00", key + b"\x01"


def _facts(row: tuple[Any, ...]) -> Facts:
    return Facts(*row)


def _values(f: Facts) -> tuple[Any, ...]:
    return (f.type, f.size, f.mode, f.mtime_ns, f.ctime_ns, f.ino, f.dev, f.nlink, f.sha256)


@dataclass(frozen=True, slots=True)
class OutboxBatch:
    n: int
    batch_id: str
    events: tuple[Event, ...]
    size: int
    header: BatchHeader | None  # None only in a row journaled before batches were chained


def _crc(body: bytes, header: bytes | None) -> int:
    return zlib.crc32(header or b"", zlib.crc32(body))


def _connect(path: Path, *, fsync: bool) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    return db


class Journal:
    """The journal as the pipeline's worker thread uses it: every index access and append happens in
    that one thread, inside `transaction()`."""

    def __init__(
        self, path: Path, *, fsync: bool = True, store: LocalStore | None = None, key: ChainKey | None = None
    ) -> None:
        self.path = path
        self.store = store
        self._key = key
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = _connect(path, fsync=fsync)
            self._db.executescript(SCHEMA)
            if "header" not in {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}:
                self._db.execute("ALTER TABLE outbox ADD COLUMN header BLOB")  # a journal made before chaining
            if store is not None:
                self._db.executescript(store.schema)
            found = self._meta("format")
            if found is None:
                self._init_meta()
            elif int(found) > FORMAT_VERSION:
                raise JournalCorrupt(f"{path}: format {found} is newer than this release reads ({FORMAT_VERSION})")
            row = self._db.execute(
                "SELECT count(*), coalesce(sum(events), 0), coalesce(sum(length(body)), 0) FROM outbox"
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            if is_corruption(exc):
                raise JournalCorrupt(f"{path}: {exc}") from exc
            raise JournalUnavailable(f"{path}: {exc}") from exc
        self._lock = threading.Lock()  # the outbox figures change in the shipper's thread too
        self._root_ids: dict[str, int] = {}
        self.outbox_batches, self.outbox_events, self.outbox_bytes = row
        self.stream_id = self._meta("stream_id") or ""
        self._next_seq = int(self._meta("next_seq") or 1)
        self._seq_at_begin = self._next_seq
        self._outbox_at_begin = (self.outbox_batches, self.outbox_events, self.outbox_bytes)
        head = self._meta("chain_head")
        self.chain = ChainHead(int(self._meta("chain_batches") or 0), bytes.fromhex(head) if head else chain.ZERO)
        self._chain = self.chain  # with the batches appended in the open transaction

    def _init_meta(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._set_meta("format", str(FORMAT_VERSION))
        self._set_meta("stream_id", str(uuid.uuid4()))
        self._set_meta("next_seq", "1")
        self._db.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # Flags ---------------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """True once a start-up scan has recorded the workspace (the index is a complete state)."""
        return self._meta("initialized") == "1"

    def mark_initialized(self) -> None:
        self._set_meta("initialized", "1")

    @property
    def needs_rebuild(self) -> bool:
        return self._meta("needs_rebuild") == "1"

    def set_needs_rebuild(self, value: bool) -> None:
        self._set_meta("needs_rebuild", "1" if value else "0")

    # Transactions --------------------------------------------------------------------------------

    def begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._seq_at_begin = self._next_seq
        self._outbox_at_begin = (self.outbox_batches, self.outbox_events, self.outbox_bytes)

    def commit(self) -> None:
        if self._next_seq != self._seq_at_begin:
            self._set_meta("next_seq", str(self._next_seq))
        if self._chain != self.chain:
            self._set_meta("chain_batches", str(self._chain.batches))
            self._set_meta("chain_head", self._chain.link.hex())
        self._db.execute("COMMIT")
        self.chain = self._chain

    def rollback(self) -> None:
        """Undo the open transaction. SQLite may already have rolled back by itself (after SQLITE_FULL);
        then there is nothing to do, and the error that caused it is the one worth reporting."""
        self._next_seq = self._seq_at_begin
        self._chain = self.chain
        with self._lock:
            self.outbox_batches, self.outbox_events, self.outbox_bytes = self._outbox_at_begin
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.begin()
        try:
            yield
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # Index ---------------------------------------------------------------------------------------

    def _root(self, path: str, *, create: bool = False) -> int | None:
        """The small id a root's rows carry (its path once, not in every row); None if it has none."""
        found = self._root_ids.get(path)
        if found is None:
            row = self._db.execute("SELECT id FROM roots WHERE path = ?", (path,)).fetchone()
            if row is None and create:
                row = (self._db.execute("INSERT INTO roots (path) VALUES (?)", (path,)).lastrowid,)
            if row is not None:
                found = self._root_ids[path] = row[0]
        return found

    def get(self, root: str, key: bytes) -> Facts | None:
        row = self._db.execute(
            f"SELECT {FACT_COLUMNS} FROM files WHERE root = ? AND key = ?", (self._root(root), key)
        ).fetchone()
        return _facts(row) if row else None

    def get_many(self, root: str, keys: list[bytes]) -> dict[bytes, Facts]:
        out: dict[bytes, Facts] = {}
        for i in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[i : i + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, *rest in self._db.execute(
                f"SELECT key, {FACT_COLUMNS} FROM files WHERE root = ? AND key IN ({marks})", (self._root(root), *chunk)
            ):
                out[key] = _facts(tuple(rest))
        return out

    def below(self, root: str, key: bytes, start: bytes, limit: int) -> list[tuple[bytes, Facts]]:
        """Up to `limit` entries strictly below `key` from `start` on (inclusive), in key order."""
        low, high = subtree_bounds(key)
        rows = self._db.execute(
            f"SELECT key, {FACT_COLUMNS} FROM files WHERE root = ? AND key >= ? AND key < ? ORDER BY key LIMIT ?",
            (self._root(root), max(low, start), high, limit),
        )
        return [(k, _facts(tuple(rest))) for k, *rest in rows]

    def below_reversed(self, root: str, key: bytes) -> Iterator[tuple[bytes, str]]:
        """(key, type) of every entry below `key`, every entry after all of its descendants."""
        low, high = subtree_bounds(key)
        before = high
        root_id = self._root(root)
        while True:
            rows = self._db.execute(
                "SELECT key, type FROM files WHERE root = ? AND key >= ? AND key < ? ORDER BY key DESC LIMIT 1000",
                (root_id, low, before),
            ).fetchall()
            yield from rows
            if len(rows) < 1000:
                return
            before = rows[-1][0]

    def put(self, root: str, key: bytes, facts: Facts) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self._root(root, create=True), key, *_values(facts)),
        )

    def put_many(self, rows: list[tuple[str, bytes, Facts]]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(self._root(root, create=True), key, *_values(f)) for root, key, f in rows],
        )

    def drop_tree(self, root: str, key: bytes) -> None:
        low, high = subtree_bounds(key)
        root_id = self._root(root)
        # Two statements, each a primary-key search: with `key = ? OR (range)` SQLite scans the whole root.
        self._db.execute("DELETE FROM files WHERE root = ? AND key = ?", (root_id, key))
        self._db.execute("DELETE FROM files WHERE root = ? AND key >= ? AND key < ?", (root_id, low, high))

    def move_tree(self, root: str, src: bytes, dst: bytes) -> None:
        """The entry at `src` and everything below it now live at `dst` (what was at `dst` is replaced)."""
        self.drop_tree(root, dst)
        low, high = subtree_bounds(src)
        root_id = self._root(root)
        self._db.execute("UPDATE files SET key = ? WHERE root = ? AND key = ?", (dst, root_id, src))
        self._db.execute(
            "UPDATE files SET key = CAST(? || substr(key, ?) AS BLOB) WHERE root = ? AND key >= ? AND key < ?",
            (dst, len(src) + 1, root_id, low, high),
        )

    def linked(self, dev: int, ino: int) -> list[tuple[str, bytes]]:
        """Every indexed name of an inode (an index search: `cp -al` of a big tree asks once per file)."""
        rows = self._db.execute(
            "SELECT roots.path, key FROM files JOIN roots ON roots.id = files.root WHERE dev = ? AND ino = ?",
            (dev, ino),
        )
        return [(path, key) for path, key in rows]

    def replace_index(self, rows: Iterable[tuple[str, bytes, Facts]]) -> None:
        """The whole index from a rebuild (inside a transaction)."""
        self._db.execute("DELETE FROM files")
        self.put_many(list(rows))

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM files").fetchone()[0]

    # Outbox --------------------------------------------------------------------------------------

    def append(
        self, events: list[Event], batch_id: str | None = None, header: BatchHeader | None = None
    ) -> OutboxBatch | None:
        """Seal a batch into the chain and add it to the outbox (inside a transaction), or with a local store,
        straight to the store: then it is committed when the transaction is, and there is nothing to ship.
        A `header` given (a batch salvaged from a corrupt journal) is kept as it is."""
        batch_id = batch_id or uuid7()
        bodies = [encode_event(e) for e in events]
        body = chain.records(bodies)
        if header is None:
            header = chain.seal(self.stream_id, self._chain, now_rfc3339(), body, len(events), self._key)
            self._chain = ChainHead(header.number, header.link)
        if self.store is not None:
            self.store.insert(self._db, Batch(batch_id, tuple(events), header), bodies)
            return None
        sealed = chain.encode_header(header)
        cursor = self._db.execute(
            "INSERT INTO outbox (batch_id, events, crc, body, header) VALUES (?, ?, ?, ?, ?)",
            (batch_id, len(events), _crc(body, sealed), body, sealed),
        )
        with self._lock:
            self.outbox_batches += 1
            self.outbox_events += len(events)
            self.outbox_bytes += len(body)
        return OutboxBatch(cursor.lastrowid or 0, batch_id, tuple(events), len(body), header)

    def salvage_store(self, aside: Path) -> int:
        """With a local store, copy the events a damaged file still yields into this one (in the caller's
        transaction): the trail shares the journal's file, and it is kept whatever the index's damage."""
        return self.store.salvage(aside, self._db) if self.store is not None else 0

    def acknowledged(self, batch: OutboxBatch) -> None:
        """The shipper deleted this batch from the outbox (its own connection): keep the figures in step."""
        with self._lock:
            self.outbox_batches -= 1
            self.outbox_events -= len(batch.events)
            self.outbox_bytes -= batch.size

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


class OutboxReader:
    """The shipper's view of the outbox: its own connection, so reading never waits for a flush."""

    def __init__(self, path: Path) -> None:
        self._db = _connect(path, fsync=False)  # an ack lost to a power cut only means a replay

    def next_batches(self, after: int, limit: int) -> list[OutboxBatch | tuple[int, str]]:
        """The next batches after `after`; a row whose checksum or body is bad comes back as (n, reason)."""
        out: list[OutboxBatch | tuple[int, str]] = []
        rows = self._db.execute(
            "SELECT n, batch_id, crc, body, header FROM outbox WHERE n > ? ORDER BY n LIMIT ?", (after, limit)
        ).fetchall()
        for n, batch_id, crc, body, header in rows:
            if _crc(body, header) != crc:
                out.append((n, "checksum mismatch"))
                continue
            try:
                events = tuple(decode_events(body))
                sealed = chain.decode_header(header) if header is not None else None
            except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                out.append((n, f"undecodable: {exc}"))
                continue
            out.append(OutboxBatch(n, batch_id, events, len(body), sealed))
        return out

    def delete_through(self, n: int) -> None:
        self._db.execute("DELETE FROM outbox WHERE n <= ?", (n,))

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


def move_aside(path: Path) -> Path:
    """Rename a corrupt journal (with its WAL) out of the way, keeping it for a post-mortem."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(aside) + suffix))
    return aside


def salvage_outbox(path: Path) -> tuple[list[tuple[str, list[Event], BatchHeader | None]], int]:
    """Batches still readable and intact in a corrupt journal, in order, with their chain headers, and how
    many rows were lost (-1 when the outbox could not be read at all)."""
    good: list[tuple[str, list[Event], BatchHeader | None]] = []
    lost = 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return good, -1
    try:
        try:
            numbers = [n for (n,) in db.execute("SELECT n FROM outbox ORDER BY n")]
        except sqlite3.Error:
            return good, -1
        for n in numbers:
            try:
                batch_id, crc, body, header = db.execute(
                    "SELECT batch_id, crc, body, header FROM outbox WHERE n = ?", (n,)
                ).fetchone()
                if _crc(body, header) != crc:
                    raise ValueError("checksum mismatch")
                good.append((batch_id, decode_events(body), chain.decode_header(header) if header else None))
            except (sqlite3.Error, ValueError, TypeError, KeyError, msgspec.DecodeError):
                lost += 1
    finally:
        db.close()
    return good, lost
