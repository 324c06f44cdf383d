"""The journal on a real SQLite file: index order and subtree moves with hostile names, the outbox and its
checksums, failed transactions (a database really out of space), corruption, and the migration of state
written by 0.1 (a real backlog, `tests/data/legacy-v0.tar.gz`)."""

from __future__ import annotations

import shutil
import sqlite3
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import disk_state, folds_to, read_events, wait_for, write_config
from sink_contract import make_event

from codi2.disk.fs import Facts, key_of, rel_of
from codi2.journal import legacy
from codi2.journal.journal import Journal, JournalCorrupt
from codi2.journal.outbox import OutboxBatch, OutboxReader
from codi2.journal.recovery import salvage_outbox
from codi2.trail.replay import fold

LEGACY = Path(__file__).parent / "data" / "legacy-v0.tar.gz"
LEGACY_ROOT = Path("/tmp/codi2-legacy-v0")


def _file(sha: str = "s", ino: int = 1) -> Facts:
    return Facts("file", 1, 0o644, 10, 10, ino, 1, 1, sha)


def _dir(ino: int = 1) -> Facts:
    return Facts("dir", None, 0o755, 10, 10, ino, 1, 2, None)


def test_keys_sort_depth_first_so_a_subtree_is_one_range(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    paths = [b"a", b"a/b", b"a/b/\xff\xfe", b"a-b", b"a.txt", b"ab", b"a\x01", b"z\nline"]
    with j.transaction():
        for p in paths:
            j.put("/r", key_of(p), _file())
    listed = [rel_of(k) for k, _ in j.below("/r", b"", b"", 100)]
    assert listed == sorted(paths, key=key_of)
    assert listed.index(b"a/b/\xff\xfe") < listed.index(b"a-b")  # a's subtree before its next sibling
    assert [rel_of(k) for k, _ in j.below("/r", key_of(b"a"), b"", 100)] == [b"a/b", b"a/b/\xff\xfe"]


def test_moving_a_subtree_replaces_the_target_and_keeps_bytes(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    with j.transaction():
        j.put("/r", key_of(b"src"), _dir(1))
        j.put("/r", key_of(b"src/\xe9t\xe9"), _file("1"))
        j.put("/r", key_of(b"src/sub/x"), _file("2"))
        j.put("/r", key_of(b"dst"), _dir(9))
        j.put("/r", key_of(b"dst/old"), _file("3"))
        j.put("/r", key_of(b"srcfoo"), _file("4"))
        j.move_tree("/r", key_of(b"src"), key_of(b"dst"))
    keys = {rel_of(k): f.sha256 for k, f in j.below("/r", b"", b"", 100)}
    assert keys == {b"dst": None, b"dst/\xe9t\xe9": "1", b"dst/sub/x": "2", b"srcfoo": "4"}


def test_index_statements_search_by_key_instead_of_scanning_the_root(tmp_path: Path) -> None:
    """Deleting or moving one entry must cost a key search, not a pass over every entry of its root: a
    scan per delete made `rm -rf` of a 100,000-file tree take minutes. Every statement the journal runs
    is checked with SQLite's own query planner."""
    j = Journal(tmp_path / "j.db")
    statements: list[str] = []
    with j.transaction():
        j.put_many([("/r", key_of(b"d/f%d" % i), _file(str(i), i + 2)) for i in range(50)] + [("/r", b"d", _dir())])
        j._db.set_trace_callback(statements.append)
        j.get("/r", key_of(b"d/f1"))
        j.get_many("/r", [key_of(b"d/f2"), key_of(b"d/f3")])
        j.below("/r", key_of(b"d"), b"", 10)
        list(j.below_reversed("/r", key_of(b"d")))
        j.drop_tree("/r", key_of(b"d/f4"))
        j.move_tree("/r", key_of(b"d"), key_of(b"e"))
        j.linked(1, 7)
        j._db.set_trace_callback(None)
    on_files = [sql for sql in statements if " files " in f"{sql} "]
    assert len(on_files) >= 9
    for sql in on_files:
        plan = " | ".join(row[3] for row in j._db.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "SCAN" not in plan, (sql, plan)
        assert "(root=?)" not in plan, (sql, plan)  # the root alone: every entry of the root is visited
    assert {rel_of(k) for k, _ in j.below("/r", b"", b"", 100)} == {b"e"} | {b"e/f%d" % i for i in range(50) if i != 4}


def test_outbox_round_trip_and_a_damaged_row_is_named(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    with j.transaction():
        j.append([make_event("a"), make_event("b")])
        j.append([make_event("c")])
    db = sqlite3.connect(tmp_path / "j.db")
    db.execute("UPDATE outbox SET body = CAST(substr(body, 1, 10) || x'00' || substr(body, 12) AS BLOB) WHERE n = 1")
    db.commit()
    db.close()
    reader = OutboxReader(tmp_path / "j.db")
    got = reader.next_batches(0, 10)
    assert got[0] == (1, "checksum mismatch")
    assert isinstance(got[1], OutboxBatch) and [e.path for e in got[1].events] == ["c"]
    j.post_ack(2)  # the shipper's reader cannot delete: the journal's owner does
    j.apply_acks()
    assert reader.next_batches(0, 10) == []
    assert (j.outbox_batches, j.outbox_events) == (0, 0)


def test_a_transaction_that_runs_out_of_space_leaves_nothing_behind(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    with j.transaction():
        j.put("/r", b"kept", _file())
    seq = j.take_seq()
    j._db.execute("PRAGMA max_page_count = 10")  # the file may not grow: SQLITE_FULL, as on a full disk
    with pytest.raises(sqlite3.OperationalError, match="full"), j.transaction():
        for i in range(2000):
            j.put("/r", b"new%d" % i, _file("x" * 64))
        j.append([make_event("never")])
    assert [k for k, _ in j.below("/r", b"", b"", 10)] == [b"kept"]
    assert j.outbox_batches == 0 and j.outbox_bytes == 0
    assert j.take_seq() == seq + 1  # numbers taken in the failed transaction are given again
    j._db.execute("PRAGMA max_page_count = 1073741823")
    with j.transaction():
        j.append([make_event("later")])
    assert j.outbox_batches == 1


def test_a_file_that_is_not_a_journal_is_refused_and_its_outbox_salvaged(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = Journal(path)
    with j.transaction():
        for i in range(5):
            j.append([make_event(f"f{i}")])
    j.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE outbox SET crc = crc + 1 WHERE n = 3")
    db.commit()
    db.close()
    batches, lost = salvage_outbox(path)
    assert [events[0].path for _, events, _ in batches] == ["f0", "f1", "f3", "f4"] and lost == 1
    assert [header.number for _, _, header in batches] == [1, 2, 4, 5]  # carried over as they were sealed
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 1000)
    with pytest.raises(JournalCorrupt):
        Journal(garbage)


@pytest.fixture
def legacy_state() -> Path:
    shutil.rmtree(LEGACY_ROOT, ignore_errors=True)
    with tarfile.open(LEGACY) as tar:
        tar.extractall("/tmp", filter="data")
    yield LEGACY_ROOT
    shutil.rmtree(LEGACY_ROOT, ignore_errors=True)


def test_legacy_backlog_and_index_are_migrated(legacy_state: Path) -> None:
    state = legacy_state / "workspace" / ".codi2"
    j = Journal(state / "journal.db")
    result = legacy.migrate(state, j)
    assert result.batches >= 1 and result.corrupt_records == 0 and not result.needs_rebuild
    assert result.index_rows == 309
    reader = OutboxReader(state / "journal.db")
    events = [e for b in reader.next_batches(0, 1000) if isinstance(b, OutboxBatch) for e in b.events]
    assert len(events) == result.events
    assert {e.path for e in events if e.action == "created" and e.type == "file"} >= {
        f"d{i // 100}/f{i}.txt" for i in range(300)
    }
    assert not (state / "spool").exists() and not (state / "index.db").exists()
    assert j.initialized and not j.needs_rebuild


def test_legacy_segment_with_a_flipped_byte_loses_one_batch_only(legacy_state: Path) -> None:
    state = legacy_state / "workspace" / ".codi2"
    intact = legacy._read_spool(state / "spool", None)[0]
    assert len(intact) >= 4
    segment = next((state / "spool").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    j = Journal(state / "journal.db")
    result = legacy.migrate(state, j)
    assert result.corrupt_records == 1 and result.batches == len(intact) - 1
    assert j.needs_rebuild  # the old index had applied the lost batch: it is derived again from the trail


def test_daemon_upgraded_over_a_legacy_backlog_ships_it_and_converges(legacy_state: Path, tmp_path: Path) -> None:
    """The whole upgrade with real processes: 0.1's backlog lands once, and the trail folds to the disk."""
    from conftest import DaemonProcess

    ws = legacy_state / "workspace"
    db = legacy_state / "audit.db"
    before = Counter(e.id for e in read_events(db))
    assert len(before) == 7
    config = write_config(tmp_path / "codi2.toml", ws, db)
    daemon = DaemonProcess(config, db)
    try:
        wait_for(lambda: daemon.status()["initial_scan"] == "done")
        wait_for(lambda: folds_to(fold(read_events(db)), disk_state(ws)))
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    events = read_events(db)
    assert max(Counter(e.id for e in events).values()) == 1  # nothing landed twice
    created = Counter(e.path for e in events if e.action == "created" and e.type == "file")
    assert {f"d{i // 100}/f{i}.txt" for i in range(300)} <= set(created)
    assert max(created.values()) == 1
    assert folds_to(fold(events), disk_state(ws))


def test_a_sidecar_with_its_own_state_dir_takes_over_the_workspace_s_old_state(
    legacy_state: Path, tmp_path: Path
) -> None:
    """0.1 kept its state in `<workspace>/.codi2`; a sidecar keeps it elsewhere. Its first start carries the
    old backlog and index over (no baseline recorded twice) and leaves the old files to the user."""
    from conftest import DaemonProcess

    ws = legacy_state / "workspace"
    db = legacy_state / "audit.db"
    config = write_config(tmp_path / "codi2.toml", ws, db, f'[state]\ndir = "{tmp_path / "state"}"')
    daemon = DaemonProcess(config, db)
    try:
        wait_for(lambda: daemon.status()["spool"]["events"] == 0)
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    events = read_events(db)
    created = Counter(e.path for e in events if e.action == "created" and e.origin != "offline")
    assert {f"d{i // 100}/f{i}.txt" for i in range(300)} <= set(created) and max(created.values()) == 1
    assert not [e for e in events if e.origin == "baseline"]  # the old index said what the trail holds
    assert (ws / ".codi2" / "index.db").exists()  # not ours to delete any more
    old_state = {k: v for k, v in disk_state(ws, ignores=(".git", "node_modules", "target", "dist")).items()}
    assert folds_to(fold(events), old_state)
