"""The local journal: one SQLite file holding the file-state index and the outbox of unshipped batches.

`<state dir>/journal.db`, WAL mode. A flush reconciles changes against the index (`codi2.journal.index`)
and appends the batch it produced to the outbox (`codi2.journal.outbox`) in **one transaction**: the index
and the trail can never disagree, whatever fails (a full disk rolls both back, a kill loses neither half
alone). `meta` holds the stream id, the next event sequence number, the chain's head (`chain_batches`,
`chain_head`), and `needs_rebuild` when the index may be ahead of the trail (a lost record) and must be
derived again from the store.

**One writer at a time.** Start-up work (open, migrate the schema and 0.1's state, recover a corrupt file)
runs before the journal thread starts; from then on the journal thread alone writes the file: the index,
the outbox, the meta and the outbox's figures (the `Ledger`). The shipper reads the outbox on a read-only
connection and *posts* what the store committed (`post_ack`); the journal thread deletes those rows
(`apply_acks`) between its flushes, so a long flush never makes the shipper's write wait for the lock and
fail, and the figures are changed with the rows. Once the journal thread has stopped, whoever closes the
journal is its owner and applies the last acknowledgements. With SQLite the store lives in this file too
(`LocalStore`): a batch is inserted into the store's tables in the flush's transaction, and there is no
outbox traffic at all.

Every batch is sealed into its stream's hash chain (`codi2.trail.chain`) by `append`, in the transaction that
makes it durable: a batch replayed after a crash carries the same link, and the head moves only when the
batch is committed.

The schema is versioned in `PRAGMA user_version` (`codi2.schema`, the journal's half). A corrupt journal
never stops the daemon: it is moved aside, whatever outbox rows still check out are carried over
(`codi2.journal.recovery`), and the index is rebuilt (see `codi2.pipeline.pipeline`).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from codi2.journal import outbox
from codi2.journal.index import Index
from codi2.journal.outbox import Ledger, OutboxBatch
from codi2.schema import BUSY_TIMEOUT_S, Schema, SchemaTooNew, execute_script
from codi2.trail import chain
from codi2.trail.chain import ChainHead, ChainKey
from codi2.trail.events import Batch, BatchHeader, Event, encode_event, now_rfc3339, uuid7

FORMAT_VERSION = 1  # written to `meta` for releases before user_version, which refuse a newer format
CACHE_KIB = 8192  # SQLite's page cache: a burst's batches touch index pages all over the file
# SQLite's primary result codes (an extended code carries one in its low byte) that mean the file's
# contents are damaged, as opposed to a file that cannot be reached (permissions, locks, I/O).
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
CORRUPTION_CODES = (SQLITE_CORRUPT, SQLITE_NOTADB)
SQLITE_INTERRUPT = 9
CHECK_PROBLEMS = 20  # problems a page check lists at most: one is enough to recover, a few to say where


def _adopt(db: sqlite3.Connection) -> None:
    """Version 1: the schema as releases before user_version left it, created where missing. Journals of
    those releases differ only in an outbox without `header` (before chaining) and an old index."""
    execute_script(
        db,
        """
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
        """
        + outbox.SCHEMA,
    )
    if "header" not in {row[1] for row in db.execute("PRAGMA table_info(outbox)")}:
        db.execute("ALTER TABLE outbox ADD COLUMN header BLOB")


def _owner(db: sqlite3.Connection) -> None:
    """Version 2: the index keeps each entry's owner and a symlink's target, so `chown` and `ln -sfn` are
    changes. Rows indexed before have them null, which no comparison counts as a change."""
    execute_script(
        db,
        """
        ALTER TABLE files ADD COLUMN uid INTEGER;
        ALTER TABLE files ADD COLUMN gid INTEGER;
        ALTER TABLE files ADD COLUMN target BLOB;
        """,
    )


SCHEMA = Schema("journal", 0, [_adopt, _owner])


class LocalStore(Protocol):
    """A store that lives in the journal's own file (SQLite): its schema, and how a batch goes in."""

    @property
    def schema(self) -> Schema: ...

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
    """SQLite said the file is damaged or is no database (by its result code: messages are not an API),
    or a check of its pages found damage."""
    if isinstance(exc, JournalCorrupt):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in CORRUPTION_CODES


def _connect(path: Path, *, fsync: bool) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    return db


class Journal(Index):
    """The journal as its one owner uses it (start-up, then the journal thread): every index access and
    append inside `transaction()`. `post_ack` is the only method other threads call."""

    def __init__(
        self, path: Path, *, fsync: bool = True, store: LocalStore | None = None, key: ChainKey | None = None
    ) -> None:
        self.path = path
        self.store = store
        self._key = key
        self._fsync = fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = _connect(path, fsync=fsync)
        except sqlite3.DatabaseError as exc:
            raise self._refused(exc) from exc
        super().__init__(db)
        try:
            self._migrate()
            if self._meta("stream_id") is None:
                self._init_meta()
            head = self._meta("chain_head")
            found = Ledger.read(
                db,
                int(self._meta("next_seq") or 1),
                ChainHead(int(self._meta("chain_batches") or 0), bytes.fromhex(head) if head else chain.ZERO),
            )
        except SchemaTooNew as exc:
            db.close()
            if exc.schema == SCHEMA.name:  # as a format newer than this release reads always was
                raise JournalCorrupt(f"{path}: {exc}") from exc
            raise JournalUnavailable(f"{path}: {exc}") from exc  # the store's: the whole trail, kept as it is
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.Error):
                db.close()
            raise self._refused(exc) from exc
        self.stream_id = self._meta("stream_id") or ""
        self._ledger = found  # with the open transaction's batches and numbers
        self._at_begin = found.copy()  # what a rollback returns to
        self.on_ack: Callable[[], None] = lambda: None  # the owner's wake-up, set by the pipeline
        self._acks = threading.Lock()
        self._acked = 0  # the newest batch number the store committed (posted by the shipper)
        self._applied = 0  # the newest one whose rows are deleted

    def _refused(self, exc: sqlite3.DatabaseError) -> Exception:
        if is_corruption(exc):
            return JournalCorrupt(f"{self.path}: {exc}")
        return JournalUnavailable(f"{self.path}: {exc}")

    def check(self, budget_s: float) -> bool:
        """`PRAGMA quick_check` of every page (b-tree structure, records, free list): damage on a page no
        query reads (an index page of `files` only a rename below it uses) is otherwise found only when
        something finally reads it. Abandoned after `budget_s` seconds (False; the owner is not held up
        longer); True when the file checked out. Raises JournalCorrupt when it did not."""
        deadline = time.monotonic() + budget_s
        self._db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            rows = self._db.execute(f"PRAGMA quick_check({CHECK_PROBLEMS})").fetchall()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) == SQLITE_INTERRUPT:
                return False
            if is_corruption(exc):
                raise JournalCorrupt(f"{self.path}: {exc}") from exc
            raise
        finally:
            self._db.set_progress_handler(None, 0)
        if rows != [("ok",)]:
            raise JournalCorrupt(f"{self.path}: " + "; ".join(str(row[0]) for row in rows))
        return True

    def _migrate(self) -> None:
        """Bring the file's schemas (the journal's, and a local store's) to this release's versions."""
        schemas = [SCHEMA] + ([self.store.schema] if self.store is not None else [])
        if all(schema.current(self._db) for schema in schemas):
            return
        with self._write():
            for schema in schemas:
                schema.migrate(self._db)

    def _init_meta(self) -> None:
        with self._write():
            self._set_meta("format", str(FORMAT_VERSION))
            self._set_meta("stream_id", str(uuid.uuid4()))
            self._set_meta("next_seq", "1")

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction for the journal's own bookkeeping (no batch in it)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # Figures, read by /status and the metrics from any thread -------------------------------------

    @property
    def outbox_batches(self) -> int:
        return self._ledger.batches

    @property
    def outbox_events(self) -> int:
        return self._ledger.events

    @property
    def outbox_bytes(self) -> int:
        return self._ledger.bytes

    @property
    def chain(self) -> ChainHead:
        """The stream's head as committed (a batch rolled back never moved it)."""
        return self._at_begin.chain

    # Flags ---------------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """True once a start-up scan has recorded the workspace (the index is a complete state)."""
        return self._meta("initialized") == "1"

    def mark_initialized(self) -> None:
        self._set_meta("initialized", "1")

    @property
    def lifecycle(self) -> str | None:
        """`running` from a run's `start` record until its `stop` record, `stopped` after: a journal left
        `running` belongs to a run that ended without a `stop` (killed). None before the first run."""
        return self._meta("lifecycle")

    def set_lifecycle(self, value: str) -> None:
        self._set_meta("lifecycle", value)

    @property
    def needs_rebuild(self) -> bool:
        return self._meta("needs_rebuild") == "1"

    def set_needs_rebuild(self, value: bool) -> None:
        self._set_meta("needs_rebuild", "1" if value else "0")

    # Transactions --------------------------------------------------------------------------------

    def begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._at_begin = self._ledger.copy()

    def commit(self) -> None:
        ledger, before = self._ledger, self._at_begin
        if ledger.next_seq != before.next_seq:
            self._set_meta("next_seq", str(ledger.next_seq))
        if ledger.chain != before.chain:
            self._set_meta("chain_batches", str(ledger.chain.batches))
            self._set_meta("chain_head", ledger.chain.link.hex())
        self._db.execute("COMMIT")
        self._at_begin = ledger.copy()

    def rollback(self) -> None:
        """Undo the open transaction. SQLite may already have rolled back by itself (after SQLITE_FULL);
        then there is nothing to do, and the error that caused it is the one worth reporting."""
        self._ledger = self._at_begin.copy()
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
        seq = self._ledger.next_seq
        self._ledger.next_seq += 1
        return seq

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
            header = chain.seal(self.stream_id, self._ledger.chain, now_rfc3339(), body, len(events), self._key)
            self._ledger.chain = ChainHead(header.number, header.link)
        if self.store is not None:
            self.store.insert(self._db, Batch(batch_id, tuple(events), header), bodies)
            return None
        n = outbox.insert(self._db, batch_id, len(events), body, chain.encode_header(header))
        self._ledger.added(len(events), len(body))
        return OutboxBatch(n, batch_id, tuple(events), len(body), header)

    def salvage_store(self, aside: Path) -> int:
        """With a local store, copy the events a damaged file still yields into this one (in the caller's
        transaction): the trail shares the journal's file, and it is kept whatever the index's damage."""
        return self.store.salvage(aside, self._db) if self.store is not None else 0

    # Acknowledgements ------------------------------------------------------------------------------

    def post_ack(self, n: int) -> None:
        """Any thread (the shipper): the store holds every batch up to `n`. The owner deletes them later."""
        with self._acks:
            self._acked = max(self._acked, n)
        self.on_ack()

    @property
    def acks_pending(self) -> bool:
        with self._acks:
            return self._acked > self._applied

    def apply_acks(self) -> None:
        """The owner, outside a transaction: delete the acknowledged rows and lower the figures with them,
        in one transaction. Not fsynced: an acknowledgement lost to a power cut only means a replay, which
        lands once. On failure (a full disk) the rows and figures stay, and the acks stay posted."""
        with self._acks:
            through = self._acked
        if through <= self._applied:
            return
        if self._fsync:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._write():
                gone = outbox.delete_through(self._db, through)
        finally:
            if self._fsync:
                self._db.execute("PRAGMA synchronous=FULL")
        self._ledger.removed(gone)
        self._at_begin.removed(gone)
        self._applied = through

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
