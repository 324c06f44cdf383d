"""The SQLite sink against the shared contract, plus what only SQLite can show: a real lock held by
another process makes writes fail with a StoreError, and they succeed once it is released."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sink_contract import SinkContract, batch_of, chain_of, make_event
from tamper import SqliteTamper, Tamper

from codi2.stores.base import Sink, StoredBatch, StoreError
from codi2.stores.sqlite import SqliteSink
from codi2.trail.verify import verify


class TestSqliteSink(SinkContract):
    @pytest.fixture
    def sink(self, tmp_path: Path) -> Iterator[Sink]:
        sink = SqliteSink(tmp_path / "audit.db")
        yield sink
        sink.close()

    @pytest.fixture
    def reopen(self, tmp_path: Path) -> Callable[[], Sink]:
        return lambda: SqliteSink(tmp_path / "audit.db", create=False)

    @pytest.fixture
    def tamper(self, tmp_path: Path) -> Tamper:
        return SqliteTamper(tmp_path / "audit.db")


def test_a_batch_that_claims_an_event_of_the_next_is_named(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "audit.db")
    for batch in chain_of([make_event("a"), make_event("b")], [make_event("c"), make_event("d")]):
        sink.write_batch(batch)
    first, _ = sink.batches("t1", "stream-1")
    SqliteTamper(tmp_path / "audit.db").put_header("t1", first.header, StoredBatch(first.header, (1, 3)))
    breaks = [(b.kind, b.batch) for b in verify(sink, "t1").streams[0].breaks]
    assert breaks == [("event_inserted", 1)]  # and batch 2 is whole: its event is read for both


def test_reader_refuses_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no audit store"):
        SqliteSink(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_locked_store_fails_then_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("codi2.stores.sqlite.BUSY_TIMEOUT_S", 0.1)
    sink = SqliteSink(tmp_path / "audit.db")
    other = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError) as info:
            sink.write_batch(batch_of(make_event("blocked")))
        assert info.value.code == "SQLITE_BUSY"
        with pytest.raises(StoreError):
            sink.ping()
    finally:
        other.execute("ROLLBACK")
        other.close()
    sink.write_batch(batch_of(make_event("after")))
    from codi2.trail.events import EventQuery

    assert [e.path for _, e in sink.read(EventQuery("t1"))] == ["after"]
    sink.close()
