"""The trail's read paths (issue #23): `--until` and `--session` pushed down to each store, verify with memory
per stream, a stream lost whole named (`missing_stream`), the index rebuild reading one user's streams, the
shipper's backlog at batch priority, and sessions from the IDE's session file."""

from __future__ import annotations

import json
import os
import sqlite3
import tracemalloc
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import fakefdb
import pytest
from conftest import WAIT_S, read_events, run_codi2, wait_for
from sink_contract import chain_of, make_event

from codi2.journal.journal import Journal
from codi2.metrics import Metrics
from codi2.ship.shipper import Shipper, StoreMonitor
from codi2.stores.base import Sink
from codi2.stores.fdb.sink import FdbSink
from codi2.stores.sqlite import SCHEMA, SqliteSink, _add_horizons, _adopt
from codi2.trail.events import LIFECYCLE, Batch, Event, EventQuery, encode_event, parse_time
from codi2.trail.verify import verify

START = 1_700_000_000


def _sessions(batches: int, per_batch: int) -> list[list[Event]]:
    """Batches alternating between sessions A and B, each a second after the last."""
    return [
        [
            make_event(f"b{b}/{i}", ts=START + b + i / 1000, session_id="ses-A" if b % 2 == 0 else "ses-B")
            for i in range(per_batch)
        ]
        for b in range(batches)
    ]


def _paths(rows: Iterator[tuple[Any, Event]]) -> list[str]:
    return [e.path for _, e in rows]


@pytest.fixture
def fdb_sink(fdb_api: ModuleType, tmp_path: Path) -> FdbSink:
    clock = iter(range(START, START + 100_000))  # one second per transaction, by the pod's clock
    return FdbSink(fdb_api.open(str(tmp_path / "fdb.cluster")), tenant_id="t1", clock=lambda: next(clock))


def _fdb_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A function that runs a read and gives (keys read, bytes read, its result) by the fake's counters."""
    data = Path(f"{tmp_path / 'fdb.cluster'}.fakefdb.sqlite")
    monkeypatch.setenv("FAKEFDB_COUNT_READS", "1")

    def reading(read: Any) -> tuple[int, int, Any]:
        before = fakefdb.counters(data)
        result = read()
        after = fakefdb.counters(data)
        return (
            after["keys_read"] - before.get("keys_read", 0),
            after["bytes_read"] - before.get("bytes_read", 0),
            result,
        )

    return reading


# --until and --session --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "fdb"])
def test_until_and_session_select_the_same_events_on_both_stores(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sink: Sink = SqliteSink(tmp_path / "audit.db") if backend == "sqlite" else request.getfixturevalue("fdb_sink")
    batches = chain_of(*_sessions(6, 3))
    for batch in batches:
        sink.write_batch(batch)
    every = [e for b in batches for e in b.events]
    until = datetime.fromtimestamp(START + 2.001, UTC)
    since = datetime.fromtimestamp(START + 1, UTC)
    assert _paths(sink.read(EventQuery("t1", until=until))) == [e.path for e in every if parse_time(e.ts) <= until]
    assert _paths(sink.read(EventQuery("t1", session_id="ses-B"))) == [e.path for e in every if e.session_id == "ses-B"]
    both = _paths(sink.read(EventQuery("t1", since=since, until=until, session_id="ses-A")))
    assert both == ["b2/0", "b2/1"]
    rows = list(sink.read(EventQuery("t1", session_id="ses-A")))
    assert _paths(sink.read(EventQuery("t1", session_id="ses-A"), after=rows[3][0])) == [e.path for _, e in rows[4:]]


def test_a_session_is_read_from_the_s_index_only(
    fdb_sink: FdbSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`events --session S` reads S's batches (and their `s` keys), none of another session's."""
    for batch in chain_of(*_sessions(40, 50)):
        fdb_sink.write_batch(batch)
    reading = _fdb_reads(tmp_path, monkeypatch)
    full_keys, full_bytes, _ = reading(lambda: list(fdb_sink.read(EventQuery("t1"))))
    keys, read_bytes, rows = reading(lambda: list(fdb_sink.read(EventQuery("t1", session_id="ses-A"))))
    print(f"\nfull {full_keys} keys, {full_bytes} B; one session of two: {keys} keys, {read_bytes} B")
    assert len(rows) == 20 * 50 and {e.session_id for _, e in rows} == {"ses-A"}
    assert keys <= 2 * 20 + 4 and read_bytes <= 0.55 * full_bytes


def test_sqlite_reads_since_and_a_session_through_their_indexes(tmp_path: Path) -> None:
    """`--since` on the last 1% goes by the time index (the planner left alone takes the commit order's and
    reads the tenant), `--session` by the session's."""
    sink = SqliteSink(tmp_path / "audit.db")
    for batch in chain_of(*_sessions(100, 10)):
        sink.write_batch(batch)
    since = datetime.fromtimestamp(START + 99, UTC)
    assert len(list(sink.read(EventQuery("t1", since=since)))) == 10
    plans: list[str] = []
    with closing(sqlite3.connect(tmp_path / "audit.db")) as db:
        real = sink._query

        def explained(sql: str, args: list[object]) -> Iterator[tuple[Any, ...]]:
            plans.append("; ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args)))
            return real(sql, args)

        sink._query = explained  # type: ignore[method-assign]
        list(sink.read(EventQuery("t1", since=since)))
        list(sink.read(EventQuery("t1", session_id="ses-A")))
    assert "USING INDEX events_tenant_ts (tenant_id=? AND ts>?)" in plans[0]
    assert "USING INDEX events_tenant_session (tenant_id=? AND session_id=? AND pos>?)" in plans[1]


def test_the_session_column_is_backfilled_for_rows_stored_before_it(tmp_path: Path) -> None:
    """A store at schema 1 (no session column): the migration fills the column from each row's record."""
    path = tmp_path / "audit.db"
    events = [make_event(f"old/{i}", session_id=f"ses-{i % 2}") for i in range(5)]
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN")
        _adopt(db)
        db.execute(f"PRAGMA user_version = {1 << SCHEMA.shift}")
        db.executemany(
            "INSERT INTO events (id, batch_id, tenant_id, ts, action, path, body) VALUES (?, 'b', ?, ?, ?, ?, ?)",
            [(e.id, e.tenant_id, e.ts, e.action, e.path.encode(), encode_event(e)) for e in events],
        )
        db.execute("COMMIT")
    sink = SqliteSink(path)
    assert _paths(sink.read(EventQuery("t1", session_id="ses-1"))) == ["old/1", "old/3"]
    with closing(sqlite3.connect(path)) as db:
        assert SCHEMA.version(db) == SCHEMA.latest


def test_a_store_at_the_horizons_step_migrates_to_the_session_column_and_the_registry(tmp_path: Path) -> None:
    """A store written by the release with retention (schema 2: horizons; no session column, no registry)
    runs the later steps in order, its horizon kept: sessions backfilled, its stream registered (with no
    predecessor: none was recorded), and verify still follows the horizon."""
    path = tmp_path / "audit.db"
    batches = chain_of(*([make_event(f"b{b}/{i}", session_id=f"ses-{b % 2}") for i in range(3)] for b in range(3)))
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN")
        _adopt(db)
        _add_horizons(db)
        db.execute(f"PRAGMA user_version = {2 << SCHEMA.shift}")
        pruned = batches[0].header
        assert pruned is not None
        db.execute("INSERT INTO horizons VALUES ('t1', ?, ?, ?, ?)", (pruned.stream_id, 1, pruned.link, pruned.ts))
        for batch in batches[1:]:
            h = batch.header
            assert h is not None
            first = None
            for e in batch.events:
                cursor = db.execute(
                    "INSERT INTO events (id, batch_id, tenant_id, ts, action, path, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (e.id, batch.batch_id, e.tenant_id, e.ts, e.action, e.path.encode(), encode_event(e)),
                )
                first = first or cursor.lastrowid
            db.execute(
                "INSERT INTO batches VALUES ('t1', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (h.stream_id, h.number, h.ts, h.prev, h.link, h.key_id, h.events, first, cursor.lastrowid),
            )
        db.execute("COMMIT")
    sink = SqliteSink(path)
    with closing(sqlite3.connect(path)) as db:
        assert SCHEMA.version(db) == SCHEMA.latest == 4
    assert _paths(sink.read(EventQuery("t1", session_id="ses-1"))) == ["b1/0", "b1/1", "b1/2"]
    assert [(entry.stream_id, entry.predecessor) for entry in sink.registry("t1")] == [("stream-1", None)]
    report = verify(sink, "t1")
    assert report.ok and report.streams[0].pruned_through == 1 and report.streams[0].batches == 2


# verify: memory per stream ----------------------------------------------------------------------------------


def _peak(tmp_path: Path, batches: int) -> int:
    sink = SqliteSink(tmp_path / f"audit-{batches}.db")
    for batch in chain_of(*([make_event(f"b{b}/{i}") for i in range(100)] for b in range(batches))):
        sink.write_batch(batch)
    tracemalloc.start()
    try:
        report = verify(sink, "t1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.trail_events == batches * 100
    return peak


def test_verify_s_memory_does_not_grow_with_the_events(tmp_path: Path) -> None:
    small, large = _peak(tmp_path, 20), _peak(tmp_path, 200)  # 2,000 and 20,000 events
    print(f"\nverify peak: 2k events {small:,} B, 20k events {large:,} B")
    assert large <= 1.5 * small


# missing_stream ---------------------------------------------------------------------------------------------


def _two_streams(sink: Sink) -> None:
    """One pod's stream, then its next (a journal lost and made anew), each of two batches."""
    for n, stream in enumerate(("stream-old", "stream-new")):
        for batch in chain_of(*([make_event(f"{stream}/{b}", ts=START + 10 * n + b)] for b in range(2)), stream=stream):
            sink.write_batch(batch)


def _sqlite_drop(db: Path, stream: str, *, registry: bool = True) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        for first, last in conn.execute("SELECT first_pos, last_pos FROM batches WHERE stream_id = ?", (stream,)):
            conn.execute("DELETE FROM events WHERE pos BETWEEN ? AND ?", (first, last))
        conn.execute("DELETE FROM batches WHERE stream_id = ?", (stream,))
        if registry:
            conn.execute("DELETE FROM streams WHERE stream_id = ?", (stream,))


def _fdb_drop(sink: FdbSink, stream: str, *, registry: bool = True) -> None:
    """Every key of the stream: its pieces, its `c` keys and its registry entry."""
    db = sink._db
    for batch in list(sink.batches("t1", stream)):
        for cursor, _ in sink.batch_events("t1", batch):
            _, _, vs, p, _ = sink._keys.unpack(cursor)
            db.clear_range_startswith(sink.key("t1", "log", vs, p))
    db.clear_range_startswith(sink.key("t1", "c", stream))
    if registry:
        db.clear(sink.key("t1", "streams", stream))


@pytest.mark.parametrize("backend", ["sqlite", "fdb"])
def test_a_stream_lost_whole_is_named(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """No chain breaks when a whole stream goes: the next stream's registry entry, which names the head it
    followed, does."""
    sink: Sink = SqliteSink(tmp_path / "audit.db") if backend == "sqlite" else request.getfixturevalue("fdb_sink")
    _two_streams(sink)
    [old, new] = sink.registry("t1")
    assert (old.stream_id, old.predecessor) == ("stream-old", None)
    assert new.predecessor is not None and new.predecessor[:2] == ("stream-old", 2)
    assert verify(sink, "t1").ok
    if isinstance(sink, FdbSink):
        _fdb_drop(sink, "stream-old")
    else:
        _sqlite_drop(tmp_path / "audit.db", "stream-old")
    report = verify(sink, "t1")
    breaks = [(s.stream_id, b.kind) for s in report.streams for b in s.breaks]
    assert not report.ok and breaks == [("stream-old", "missing_stream")]


@pytest.mark.parametrize("backend", ["sqlite", "fdb"])
def test_a_stream_pruned_whole_is_not_a_missing_stream(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A prune is no loss: a predecessor pruned whole is held by its horizon, and a stream begun after it
    names the horizon as the head it follows. That horizon gone, the stream is named lost."""
    sink: Sink = SqliteSink(tmp_path / "audit.db") if backend == "sqlite" else request.getfixturevalue("fdb_sink")
    _two_streams(sink)
    sink.prune(sink.retention_plan("t1", datetime.fromtimestamp(START + 5, UTC)))  # stream-old, whole
    report = verify(sink, "t1")
    assert report.ok, [(s.stream_id, b.kind) for s in report.streams for b in s.breaks]
    assert [s.stream_id for s in report.streams] == ["stream-new"]
    sink.prune(sink.retention_plan("t1", datetime.fromtimestamp(START + 100, UTC)))  # stream-new too
    for batch in chain_of([make_event("stream-3/0", ts=START + 200)], stream="stream-3"):
        sink.write_batch(batch)
    entry = sink.registry("t1")[-1]
    assert entry.stream_id == "stream-3" and entry.predecessor is not None
    assert entry.predecessor[:2] == ("stream-new", 2)
    assert verify(sink, "t1").ok
    if isinstance(sink, FdbSink):
        sink._db.clear(sink.key("t1", "h", "stream-new"))
    else:
        with closing(sqlite3.connect(tmp_path / "audit.db")) as conn, conn:
            conn.execute("DELETE FROM horizons WHERE stream_id = 'stream-new'")
    report = verify(sink, "t1")
    breaks = {(s.stream_id, b.kind) for s in report.streams for b in s.breaks}
    assert not report.ok and breaks == {("stream-new", "missing_stream")}


@pytest.mark.parametrize("backend", ["sqlite", "fdb"])
def test_delete_tenant_removes_its_streams_registry(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Offboarding leaves no registry entry behind (one would name a stream lost to the next verify)."""
    sink: Sink = SqliteSink(tmp_path / "audit.db") if backend == "sqlite" else request.getfixturevalue("fdb_sink")
    _two_streams(sink)
    sink.delete_tenant("t1")
    assert sink.registry("t1") == [] and verify(sink, "t1").ok


def test_a_registered_stream_with_no_batch_is_named(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "audit.db")
    _two_streams(sink)
    _sqlite_drop(tmp_path / "audit.db", "stream-new", registry=False)  # the tail: no successor names it
    report = verify(sink, "t1")
    assert [(s.stream_id, b.kind) for s in report.streams for b in s.breaks] == [("stream-new", "missing_stream")]


def test_codi2_verify_exits_1_naming_a_lost_stream(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    _two_streams(SqliteSink(db))
    _sqlite_drop(db, "stream-old")
    config = tmp_path / "codi2.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(db))}\n')
    result = run_codi2("verify", "--config", str(config), "--tenant-id", "t1", timeout=WAIT_S)
    assert result.returncode == 1, result.stderr
    assert "stream stream-old" in result.stdout and "BREAK missing_stream" in result.stdout


# the index rebuild: one user's streams ----------------------------------------------------------------------


def test_the_rebuild_reads_none_of_another_user_s_batches(
    fdb_sink: FdbSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = chain_of([make_event("mine/a"), make_event("mine/b")], stream="stream-u1")
    theirs = chain_of(
        *([make_event(f"theirs/{b}/{i}", user_id="u2", pod="pod-2") for i in range(50)] for b in range(30)),
        stream="stream-u2",
    )
    for batch in [*theirs[:15], *mine, *theirs[15:]]:
        fdb_sink.write_batch(batch)
    reading = _fdb_reads(tmp_path, monkeypatch)
    _, full_bytes, _ = reading(lambda: list(fdb_sink.read(EventQuery("t1"))))
    keys, read_bytes, events = reading(lambda: list(fdb_sink.user_trail("t1", "u1", {"/workspace"})))
    print(f"\nrebuild of u1: {keys} keys, {read_bytes} B (the tenant: {full_bytes} B)")
    assert [e.path for e in events] == ["mine/a", "mine/b"]
    assert read_bytes < full_bytes / 30  # less than one of the other user's batches
    assert list(fdb_sink.user_trail("t1", "u1", {"/elsewhere"})) == []


# the shipper's backlog ---------------------------------------------------------------------------------------


class Recording:
    """A SQLite store that records what the shipper says of its backlog."""

    name = "sqlite"

    def __init__(self, sink: SqliteSink) -> None:
        self.sink = sink
        self.draining: list[bool] = []

    def write_batch(self, batch: Batch) -> None:
        self.sink.write_batch(batch)

    def draining_backlog(self, draining: bool) -> None:
        self.draining.append(draining)

    def ping(self) -> None:
        self.sink.ping()

    def close(self) -> None:
        self.sink.close()


def test_the_shipper_replays_a_backlog_as_one_and_says_when_it_caught_up(tmp_path: Path) -> None:
    """40 batches waiting in the outbox (the store was down): read back a chunk at a time, at the store's
    batch priority until the last chunk."""
    journal = Journal(tmp_path / "journal.db")
    for i in range(40):
        with journal.transaction():
            journal.append([make_event(f"waiting/{i}")])
    store = Recording(SqliteSink(tmp_path / "audit.db"))
    shipper = Shipper(journal, store, StoreMonitor(Metrics()), on_batch_lost=lambda n, reason: None)
    shipper.start()
    try:
        wait_for(lambda: len(read_events(tmp_path / "audit.db")) == 40 and store.draining == [True, False])
    finally:
        shipper.stop(0)
        journal.close()
        store.close()


# sessions ----------------------------------------------------------------------------------------------------


def test_each_event_carries_the_session_current_when_it_was_recorded(
    workspace: Path, tmp_path: Path, daemon_factory: Any
) -> None:
    session = tmp_path / "session"
    session.write_text("ses-old\n")
    daemon = daemon_factory(env={"CODI2_MONITORING__SESSION_FILE": str(session)})
    (workspace / "before.txt").write_text("x")
    wait_for(lambda: "before.txt" in {e.path for e in daemon.events()})
    session.write_text("ses-new\n")  # the IDE opened another session
    (workspace / "after.txt").write_text("x")
    wait_for(lambda: "after.txt" in {e.path for e in daemon.events()})
    assert daemon.terminate() == 0
    sessions = {e.path: e.session_id for e in daemon.events()}
    assert sessions["before.txt"] == "ses-old" and sessions["after.txt"] == "ses-new"
    result = run_codi2("events", "--config", str(daemon.config), "--tenant-id", "t1", "--session", "ses-new")
    assert result.returncode == 0, result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["path"] for e in found if e["action"] not in LIFECYCLE] == ["after.txt"]  # and the daemon's stop record
    assert {e["session_id"] for e in found} == {"ses-new"}


@pytest.mark.parametrize("planted", ["fifo", "symlink to a file", "symlinked directory"])
def test_a_session_file_the_user_replaces_never_stalls_or_leaks(
    workspace: Path, tmp_path: Path, daemon_factory: Any, planted: str
) -> None:
    """The session file lives in the workspace, so the user may replace it. A FIFO there blocked the journal
    thread in open() for good (nothing recorded any more, /status still ok), and a symlink (to the file, or to
    its directory) made codi2 read any file it may read (a Secret's cluster file, a TLS key) into every
    event's session_id. Now it is opened without following a symlink below the root and without blocking,
    and anything but a regular file reads as no session."""
    theia = workspace / ".theia"
    theia.mkdir()
    session = theia / "session"
    session.write_text("ses-1\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "session").write_text("cluster:SECRET@10.0.0.1:4500\n")
    daemon = daemon_factory(env={"CODI2_MONITORING__SESSION_FILE": str(session), "SESSION_ID": "fixed"})
    (workspace / "before.txt").write_text("x")
    wait_for(lambda: "before.txt" in {e.path for e in daemon.events()})
    session.unlink()
    if planted == "fifo":
        os.mkfifo(session)
    elif planted == "symlink to a file":
        session.symlink_to(secret / "session")
    else:
        theia.rename(workspace / ".theia-old")
        theia.symlink_to(secret)
    (workspace / "after.txt").write_text("x")
    wait_for(lambda: "after.txt" in {e.path for e in daemon.events()})
    assert daemon.terminate() == 0
    sessions = {e.path: e.session_id for e in daemon.events()}
    assert sessions["before.txt"] == "ses-1" and sessions["after.txt"] == "fixed"
    assert not [e for e in daemon.events() if "SECRET" in str(e.session_id)]
