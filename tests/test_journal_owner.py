"""journal.db has one writer: the journal thread. The shipper reads the outbox on a read-only connection and
posts acknowledgements, which the journal thread applies between flushes; corruption is told by SQLite's
result codes; the schemas are versioned in `user_version`, and a journal of the release before (no
version, `tests/data/journal-v0.tar.gz`) is carried over. Real SQLite files, the real pipeline and shipper
threads in-process, a real SQLite store."""

from __future__ import annotations

import sqlite3
import tarfile
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
import structlog
from conftest import WAIT_S, read_events, wait_for
from sink_contract import make_event

from codi2.config import BatchingSettings, MonitoringSettings, SpoolSettings
from codi2.disk.fs import Facts, key_of
from codi2.disk.ignore import IgnoreRules
from codi2.journal.journal import SCHEMA as JOURNAL_SCHEMA
from codi2.journal.journal import Journal, JournalCorrupt, JournalUnavailable, is_corruption
from codi2.journal.outbox import OutboxBatch, OutboxReader
from codi2.metrics import Metrics
from codi2.pipeline.pipeline import JournalFile, Pipeline
from codi2.ship import shipper as shipper_module
from codi2.ship.shipper import Shipper, StoreMonitor
from codi2.stores.base import StoreError
from codi2.stores.sqlite import SCHEMA as STORE_SCHEMA
from codi2.stores.sqlite import LocalStore, SqliteSink
from codi2.trail.events import Batch, EventQuery, Identity
from codi2.watch.hints import Touch

V0 = Path(__file__).parent / "data" / "journal-v0.tar.gz"


def _rows(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        count: int = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return count


def _numbers(path: Path) -> list[int]:
    with closing(sqlite3.connect(path)) as db:
        return [n for (n,) in db.execute("SELECT n FROM outbox ORDER BY n")]


def _pipeline(ws: Path, state: Path, store: SqliteSink, monitor: StoreMonitor) -> Pipeline:
    """The pipeline as the daemon builds it for a remote store (the journal a file of its own)."""
    pipeline = Pipeline(
        roots=[ws],
        journal_file=JournalFile(state / "journal.db", state),
        rules=IgnoreRules([], [ws]),
        identity=Identity("t1", "u1", None, "pod-1"),
        metrics=Metrics(),
        store=monitor,
        batching=BatchingSettings(max_events=1000, max_bytes=1 << 20, max_delay_ms=10),
        spool=SpoolSettings(max_bytes=1 << 30, fsync=True),
        monitoring=MonitoringSettings(watch_paths=[ws], hash_max_bytes=1 << 20, initial_scan="record"),
    )
    pipeline.open()
    pipeline.trail = store
    return pipeline


class CountingReader(OutboxReader):
    """The shipper's reader, counting its reads: a read after the first batch means that batch was acknowledged."""

    reads = 0

    def next_batches(self, after: int, limit: int) -> list[OutboxBatch | tuple[int, str]]:
        CountingReader.reads += 1
        return super().next_batches(after, limit)


class Outage:
    """The store, down while `down` is set (as a network outage: retried by the shipper)."""

    name = "sqlite"

    def __init__(self, sink: SqliteSink) -> None:
        self.sink = sink
        self.down = False

    def write_batch(self, batch: Batch) -> None:
        if self.down:
            raise StoreError("store unreachable", code="unreachable")
        self.sink.write_batch(batch)

    def draining_backlog(self, draining: bool) -> None:
        self.sink.draining_backlog(draining)

    def ping(self) -> None:
        self.sink.ping()

    def close(self) -> None:
        self.sink.close()


def test_an_ack_during_a_long_flush_deletes_the_row_and_the_figures_stay_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the shipper deleted shipped rows on its own connection; while a flush held the write lock
    that delete waited the busy timeout and failed ("database is locked"), the row stayed, and the figures
    were lowered anyway. Now the ack goes to the journal thread, which deletes the row after the flush. (The
    store then goes down, so that no later ack deletes the row in passing.)"""
    ws, state = tmp_path / "ws", tmp_path / "state"
    ws.mkdir()
    (ws / "a").write_text("a")
    store = SqliteSink(tmp_path / "audit.db")
    monitor = StoreMonitor(Metrics())
    pipeline = _pipeline(ws, state, store, monitor)
    journal = pipeline.journal
    assert journal is not None
    pipeline.start()
    hold, entered, release = threading.Event(), threading.Event(), threading.Event()
    commit = Journal.commit

    def held(self: Journal) -> None:
        if hold.is_set() and not entered.is_set():
            entered.set()
            release.wait(WAIT_S)
        commit(self)

    monkeypatch.setattr(Journal, "commit", held)
    monkeypatch.setattr(shipper_module, "OutboxReader", CountingReader)
    CountingReader.reads = 0
    outage = Outage(store)
    shipper = Shipper(journal, outage, monitor, on_batch_lost=lambda n, reason: None)
    with structlog.testing.capture_logs() as logs:
        try:
            pipeline.initial_scan()
            wait_for(lambda: pipeline.journal_health.initial_scan == "done" and journal.outbox_batches == 1)
            hold.set()
            (ws / "b").write_text("b")
            pipeline.feed([Touch(0, b"b", created=True)])
            wait_for(entered.is_set)  # the flush of `b` holds the write lock
            pipeline.on_committed = shipper.hand
            shipper.start()
            wait_for(lambda: CountingReader.reads >= 2)  # batch 1 is in the store, and acknowledged
            outage.down = True
            release.set()
            wait_for(lambda: _numbers(journal.path) == [2] and journal.outbox_batches == 1)  # only `b`'s batch waits
            assert [e.path for e in read_events(tmp_path / "audit.db")] == ["a"]
            outage.down = False
            wait_for(lambda: _rows(journal.path) == 0 and journal.outbox_batches == 0)
            assert [e.path for e in read_events(tmp_path / "audit.db")] == ["a", "b"]
        finally:
            release.set()
            shipper.stop(0)
            pipeline.stop(0)
            pipeline.close()
            store.close()
    assert not [line for line in logs if line["event"] in ("outbox_ack_failed", "shipper_failed")], logs


def test_the_shipper_s_connection_cannot_write(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    with journal.transaction():
        journal.append([make_event("a")])
    reader = OutboxReader(journal.path)
    with pytest.raises(sqlite3.OperationalError) as info:
        reader._db.execute("DELETE FROM outbox")
    assert info.value.sqlite_errorname == "SQLITE_READONLY"
    assert len(reader.next_batches(0, 10)) == 1 and _rows(journal.path) == 1
    reader.close()
    journal.close()


def _idle_pipeline(tmp_path: Path) -> tuple[Pipeline, Journal, SqliteSink]:
    ws, state = tmp_path / "ws", tmp_path / "state"
    ws.mkdir()
    store = SqliteSink(tmp_path / "audit.db")
    pipeline = _pipeline(ws, state, store, StoreMonitor(Metrics()))
    journal = pipeline.journal
    assert journal is not None
    with journal.transaction():
        journal.append([make_event("one")])
        journal.append([make_event("two")])
    return pipeline, journal, store


def test_an_idle_journal_thread_wakes_for_an_ack(tmp_path: Path) -> None:
    pipeline, journal, store = _idle_pipeline(tmp_path)
    pipeline.start()
    try:
        pipeline.initial_scan()
        wait_for(lambda: pipeline.journal_health.initial_scan == "done")
        journal.post_ack(1)  # idle: no hint, no window; only the ack wakes it
        wait_for(lambda: _rows(journal.path) == 1)
        assert (journal.outbox_batches, journal.outbox_events) == (1, 1)
    finally:
        pipeline.stop(0)
        pipeline.close()
        store.close()


def test_acks_posted_after_the_journal_thread_stopped_are_applied_by_the_closer(tmp_path: Path) -> None:
    """The daemon stops the journal thread first (its last batch then ships): the last acks are not lost."""
    pipeline, journal, store = _idle_pipeline(tmp_path)
    pipeline.start()
    pipeline.stop(0)
    assert not pipeline.running
    journal.post_ack(2)
    pipeline.settle_acks()
    assert journal.outbox_batches == 0 and _rows(journal.path) == 0
    pipeline.close()
    store.close()


def test_a_full_disk_keeps_the_acknowledged_rows_and_their_figures_until_it_works(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    with journal.transaction():
        journal.append([make_event("a")])
    journal._db.execute("PRAGMA query_only = ON")  # any write fails, as on a full disk
    journal.post_ack(1)
    with pytest.raises(sqlite3.OperationalError):
        journal.apply_acks()
    assert journal.acks_pending and journal.outbox_batches == 1 and _rows(journal.path) == 1
    journal._db.execute("PRAGMA query_only = OFF")
    journal.apply_acks()
    assert not journal.acks_pending and journal.outbox_batches == 0 and _rows(journal.path) == 0


# Corruption, by result code ----------------------------------------------------------------------------


def _error_of(run: Callable[[], object]) -> sqlite3.Error:
    with pytest.raises(sqlite3.Error) as info:
        run()
    return info.value


def test_corruption_is_told_by_result_code_not_by_message(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 1000)
    notadb = _error_of(lambda: sqlite3.connect(garbage).execute("SELECT * FROM sqlite_master"))
    assert is_corruption(notadb)
    # A malformed argument is no damaged file, whatever the message says.
    assert not is_corruption(_error_of(lambda: sqlite3.connect(":memory:").execute("SELECT json('{')")))
    # An extended code (SQLITE_CORRUPT_INDEX) with a message of no known wording.
    extended = sqlite3.DatabaseError("an index does not match its table")
    extended.sqlite_errorcode = 11 | 3 << 8
    assert is_corruption(extended)
    assert not is_corruption(sqlite3.DatabaseError("database disk image is malformed"))  # no code: not SQLite's


# Schema versions ---------------------------------------------------------------------------------------


@pytest.fixture
def v0(tmp_path: Path) -> Path:
    """A journal (`journal.db`) and a SQLite store holding a journal (`audit.db`), as the release before
    user_version left them: two batches of three events, an index of four entries."""
    with tarfile.open(V0) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path


def _user_version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
        return version


def test_a_journal_of_the_release_before_is_carried_over(v0: Path) -> None:
    path = v0 / "journal.db"
    with closing(sqlite3.connect(path)) as db:
        stream, head = (dict(db.execute("SELECT key, value FROM meta"))[k] for k in ("stream_id", "chain_head"))
    assert _user_version(path) == 0
    journal = Journal(path)
    assert _user_version(path) == JOURNAL_SCHEMA.latest == 2
    assert journal.get("/ws", b"a") is not None and journal.get("/ws", b"a").uid is None  # never known, not 0
    assert (journal.stream_id, journal.chain.batches, journal.chain.link.hex()) == (stream, 2, head)
    assert (journal.outbox_batches, journal.outbox_events) == (2, 3)
    assert journal.initialized and not journal.needs_rebuild
    assert [k for k, _ in journal.below("/ws", b"", b"", 10)] == [key_of(p) for p in (b"a", b"d", b"d/b", b"d/c")]
    assert journal.take_seq() == 4
    with journal.transaction():
        batch = journal.append([make_event("e")])
    assert batch is not None and batch.header is not None and batch.header.number == 3
    shipped = OutboxReader(path).next_batches(0, 10)
    assert [[e.path for e in b.events] for b in shipped if isinstance(b, OutboxBatch)] == [["a", "d/b"], ["d/c"], ["e"]]
    journal.close()


def test_a_journal_of_version_1_gets_the_owner_columns_by_its_numbered_step(tmp_path: Path) -> None:
    """Step 2 adds uid, gid and target to the index; its rows keep what they had, the new facts unknown."""
    path = tmp_path / "journal.db"
    journal = Journal(path)
    with journal.transaction():
        journal.put("/ws", b"a", Facts("file", 1, 0o644, 10, 10, 7, 1, 1, "s"))
    journal.close()
    with closing(sqlite3.connect(path)) as db, db:
        for column in ("uid", "gid", "target"):
            db.execute(f"ALTER TABLE files DROP COLUMN {column}")
        db.execute("PRAGMA user_version = 1")
    journal = Journal(path)
    assert _user_version(path) == 2
    assert journal.get("/ws", b"a") == Facts("file", 1, 0o644, 10, 10, 7, 1, 1, "s", None, None, None)
    with journal.transaction():
        journal.put("/ws", b"l", Facts("symlink", 1, 0o777, 10, 10, 8, 1, 1, None, 1000, 2**32 - 2, b"\xff"))
    assert journal.get("/ws", b"l") == Facts("symlink", 1, 0o777, 10, 10, 8, 1, 1, None, 1000, 2**32 - 2, b"\xff")
    journal.close()


def test_a_journal_before_chaining_gets_its_header_column(v0: Path) -> None:
    path = v0 / "journal.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("DELETE FROM outbox")
        db.execute("ALTER TABLE outbox DROP COLUMN header")
    journal = Journal(path)
    with journal.transaction():
        journal.append([make_event("e")])
    [batch] = OutboxReader(path).next_batches(0, 10)
    assert isinstance(batch, OutboxBatch) and batch.header is not None
    journal.close()


def test_a_sqlite_store_with_its_journal_of_the_release_before_is_carried_over(v0: Path) -> None:
    path = v0 / "audit.db"
    journal = Journal(path, store=LocalStore())
    assert _user_version(path) == JOURNAL_SCHEMA.latest | STORE_SCHEMA.latest << 16  # the journal's half, the store's
    assert journal.chain.batches == 2 and journal.count() == 4
    with journal.transaction():
        journal.append([make_event("e")])
    journal.close()
    assert [e.path for e in read_events(path)] == ["a", "d/b", "d/c", "e"]


def test_a_migrated_file_is_opened_without_a_write(v0: Path) -> None:
    path = v0 / "audit.db"
    Journal(path, store=LocalStore()).close()
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: a reader's open must not need it
        sink = SqliteSink(path, create=False)
        assert len(list(sink.read(EventQuery("t1")))) == 3
        sink.close()
        other.execute("ROLLBACK")


def test_a_schema_newer_than_this_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal(path).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 3")  # the journal's half, one step ahead
    with pytest.raises(JournalCorrupt, match="journal schema 3 is newer than this release reads"):
        Journal(path)
    store = tmp_path / "audit.db"
    Journal(store, store=LocalStore()).close()
    with closing(sqlite3.connect(store)) as db:
        ahead = STORE_SCHEMA.latest + 1
        db.execute(
            f"PRAGMA user_version = {JOURNAL_SCHEMA.latest | ahead << 16}"
        )  # the store's half ahead: the trail is kept as it is
    with pytest.raises(JournalUnavailable, match=f"store schema {ahead}"):
        Journal(store, store=LocalStore())
    with pytest.raises(StoreError, match=f"store schema {ahead}"):
        SqliteSink(store, create=False)
