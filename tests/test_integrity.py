"""The trail's loose ends in the daemon (issue #22, "Also"), each on a real `codi2 run` subprocess: writes
through hard links the watcher cannot see, journal pages damaged where the daemon does not look, the
journal's first page overwritten under it, /status during a long hash, writes through a shared mapping.
Where the case is about lag the daemon is stopped (SIGSTOP) around the operations; every test ends with
the trail folded to the disk without defects."""

from __future__ import annotations

import contextlib
import mmap
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, wait_for
from trail_checks import converge, ever_named, final_check, lagging, overwrite_pages, sha

from codi2.disk.fs import RACY_NS
from codi2.trail.events import Event
from codi2.trail.replay import fold_events

Start = Callable[..., DaemonProcess]
LAG = pytest.mark.parametrize("lag", [True, False], ids=["lagging", "keeping-up"])
FAST_RECHECK = {"CODI2_MONITORING__RESCAN_INTERVAL_S": "1"}


def _maybe_lagging(daemon: DaemonProcess, lag: bool) -> contextlib.AbstractContextManager[None]:
    return lagging(daemon) if lag else contextlib.nullcontext()


def _folded(events: list[Event], ws: Path, path: str) -> Event:
    return fold_events(events)[(str(ws), path)]


def _out_of_sight(ws: Path, tmp_path: Path, where: str) -> Path:
    """A directory the watcher never sees: an ignored tree inside the root, or one outside every root."""
    place = ws / "node_modules" if where == "ignored" else tmp_path / "outside"
    place.mkdir()
    return place


def _write_in_place(path: Path, data: bytes) -> None:
    """Through this name: every hard link of the file sees it."""
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


# 1. A write through a hard link whose other name is ignored or outside the roots ------------------------


@LAG
@pytest.mark.parametrize("where", ["ignored", "outside"])
def test_a_write_through_a_name_moved_out_of_sight_reaches_the_watched_name(
    workspace: Path, tmp_path: Path, daemon_factory: Start, lag: bool, where: str
) -> None:
    """The fidelity machine's case: `ln a/f a/g; mv a/g node_modules/g; echo > node_modules/g`. The
    write has no inotify event, yet `a/f` changed: the file's link count exceeds its indexed names, so
    it is looked at again each round."""
    ws = workspace
    (ws / "a").mkdir()
    (ws / "a" / "f").write_bytes(b"before")
    place = _out_of_sight(ws, tmp_path, where)
    daemon = daemon_factory(env=FAST_RECHECK)
    os.link(ws / "a" / "f", ws / "a" / "g")
    converge(daemon, ws)
    with _maybe_lagging(daemon, lag):
        (ws / "a" / "g").rename(place / "g")
    converge(daemon, ws)
    _write_in_place(place / "g", b"written through the name out of sight")
    events = converge(daemon, ws)
    assert _folded(events, ws, "a/f").sha256 == sha("written through the name out of sight")
    with _maybe_lagging(daemon, lag):
        _write_in_place(place / "g", b"and again")
    events = converge(daemon, ws)
    assert _folded(events, ws, "a/f").sha256 == sha("and again")
    final_check(daemon, ws)


@pytest.mark.parametrize("where", ["ignored", "outside"])
def test_a_write_through_a_name_out_of_sight_from_before_the_start_reaches_the_watched_name(
    workspace: Path, tmp_path: Path, daemon_factory: Start, where: str
) -> None:
    """The link was made while the daemon was down: the start-up walk finds `f` with two links and one
    name in the index."""
    ws = workspace
    (ws / "f").write_bytes(b"before")
    place = _out_of_sight(ws, tmp_path, where)
    os.link(ws / "f", place / "f")
    daemon = daemon_factory(env=FAST_RECHECK)
    _write_in_place(place / "f", b"through the other name")
    events = converge(daemon, ws)
    assert _folded(events, ws, "f").sha256 == sha("through the other name")
    (place / "f").unlink()  # its last name out of sight gone: the file leaves the list, and still converges
    _write_in_place(ws / "f", b"through the watched name")
    final_check(daemon, ws)


# 2. Scattered corruption in the journal, found at start ------------------------------------------------


def _inode_index_root(db: sqlite3.Connection) -> list[int]:
    """The root page of `files_inode`: only a write to `files` or a lookup of an inode's names reads it."""
    return [db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'files_inode'").fetchone()[0]]


def test_a_damaged_index_page_is_found_at_start_recovered_and_marked_with_a_gap(
    workspace: Path, daemon_factory: Start
) -> None:
    ws = workspace
    for i in range(300):
        (ws / f"d{i % 7}").mkdir(exist_ok=True)
        (ws / f"d{i % 7}" / f"f{i}").write_text(f"file {i}")
    # Hashed once their ctime is past the racy window, the files' rows are final: the next start's diff
    # reads `files` by key and writes nothing, so only a check of every page finds the damage.
    newest = max(p.stat().st_ctime_ns for p in ws.rglob("*"))
    wait_for(lambda: time.time_ns() - newest > RACY_NS, interval=0.2)
    daemon = daemon_factory()
    assert daemon.terminate() == 0
    overwrite_pages(daemon.db, _inode_index_root, b"\xa5")
    again = daemon_factory()
    assert again.logged("journal_corrupt"), again.logs[-10:]
    assert again.logged("journal_recovered")
    assert any(p.name.startswith(f"{daemon.db.name}.corrupt-") for p in daemon.db.parent.iterdir())
    events = converge(again, ws)
    assert [e.dest_path for e in events if e.action == "gap"] == ["journal_corrupt"]
    (ws / "d0" / "after").write_text("recorded after the recovery")
    final_check(again, ws)


# 3. The journal's first page overwritten under a running daemon ---------------------------------------


def test_the_first_page_overwritten_under_a_running_daemon_is_recovered_in_place(
    workspace: Path, daemon_factory: Start
) -> None:
    """With SQLite the journal is the store's file. An earlier fix made the journal thread recover
    instead of dying (`journal_thread_failed`, until /livez restarted the pod): this proves it still does,
    with neither a restart nor a dead thread."""
    ws = workspace
    (ws / "before.txt").write_text("before")
    daemon = daemon_factory()
    overwrite_pages(daemon.db, lambda db: [1], b"\xa5")
    (ws / "later.txt").write_text("a change after the damage")
    wait_for(lambda: daemon.logged("journal_recovered") or daemon.logged("journal_thread_failed"))
    assert daemon.logged("journal_thread_failed") == []
    events = converge(daemon, ws)
    assert "journal_corrupt" in [e.dest_path for e in events if e.action == "gap"]
    status = daemon.status()
    assert status["status"] == "ok" and status["ready"], status
    assert daemon.get("/livez")[0] == 200
    final_check(daemon, ws)


# 4. /status while a big file is hashed -----------------------------------------------------------------


def test_status_shows_the_hash_in_progress(workspace: Path, daemon_factory: Start) -> None:
    """A sparse file of several GB (no real writes) within `hash_max_bytes`: while it is read, /status says
    which file, how far, out of how much, where `pending_changes` alone said 0."""
    ws = workspace
    size = 6 << 30
    daemon = daemon_factory(env={"CODI2_MONITORING__HASH_MAX_BYTES": str(8 << 30)})
    with open(ws / "big.bin", "wb") as f:
        f.truncate(size)
    seen = wait_for(lambda: daemon.status()["pipeline"]["hashing"], interval=0.02)
    assert seen["path"] == str(ws / "big.bin")
    assert seen["bytes_total"] == size and 0 < seen["bytes_done"] <= size
    wait_for(lambda: "big.bin" in ever_named(daemon.events()))
    assert daemon.status()["pipeline"]["hashing"] is None


# 5. Writes through a shared mapping --------------------------------------------------------------------


def test_a_write_through_a_shared_mapping_is_recorded_at_close(workspace: Path, daemon_factory: Start) -> None:
    """inotify reports no write made through a mapping: the trail learns of it from the close of the
    descriptor opened for writing (IN_CLOSE_WRITE), as README says."""
    ws = workspace
    (ws / "mapped.bin").write_bytes(b"A" * 4096)
    daemon = daemon_factory()
    fd = os.open(ws / "mapped.bin", os.O_RDWR)
    try:
        with mmap.mmap(fd, 4096) as mapped:
            mapped[:] = b"B" * 4096
            mapped.flush()
            (ws / "marker").write_text("after the write through the mapping")
            wait_for(lambda: "marker" in ever_named(daemon.events()))
            assert _folded(daemon.events(), ws, "mapped.bin").sha256 == sha(b"A" * 4096)  # no event for it
    finally:
        os.close(fd)
    events = converge(daemon, ws)
    assert _folded(events, ws, "mapped.bin").sha256 == sha(b"B" * 4096)
    final_check(daemon, ws)
