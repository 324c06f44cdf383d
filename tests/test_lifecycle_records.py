"""The daemon's own life in the trail (issue 24): `start` and `stop` records, chained like every event;
the coverage `codi2 verify` reports from them; the start-up diff's progress; log lines bound to the
daemon's identity. The real daemon as a subprocess on a real tree, SQLite store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, read_events, wait_for
from trail_checks import run_verify

from codi2.trail.coverage import detail_of
from codi2.trail.events import Action, Event

Start = Callable[..., DaemonProcess]


def _lifecycle(daemon: DaemonProcess) -> list[tuple[str, dict[str, Any]]]:
    return [(e.action, detail_of(e)) for e in read_events(daemon.db, lifecycle=True) if e.action in ("start", "stop")]


def _records(daemon: DaemonProcess) -> list[Event]:
    return [e for e in read_events(daemon.db, lifecycle=True) if e.action in ("start", "stop")]


def test_each_run_has_a_start_and_a_stop_and_the_next_says_how_the_last_ended(
    workspace: Path, daemon_factory: Start
) -> None:
    (workspace / "a.txt").write_text("a")
    daemon = daemon_factory()
    assert daemon.terminate() == 0
    (workspace / "b.txt").write_text("made while nobody watched")
    (workspace / "c.txt").write_text("and this")
    daemon = daemon_factory()
    assert daemon.terminate() == 0
    records = _records(daemon)
    details = [detail_of(e) for e in records]
    assert [(e.action, d.get("phase")) for e, d in zip(records, details, strict=True)] == [
        ("start", "watching"),
        ("start", "scanned"),
        ("stop", None),
    ] * 2
    first, scanned, stop, again, rescanned, _ = details
    assert first["previous_run"] == "none" and again["previous_run"] == "clean"
    assert first["version"] and first["backend"] == "sqlite" and first["roots"] == [str(workspace)]
    assert len(first["config_sha256"]) == 64 and first["config_sha256"] == again["config_sha256"]
    assert records[0].sha256 == first["config_sha256"]
    assert (scanned["origin"], scanned["entries"], scanned["changes"]) == ("baseline", 1, 1)
    assert (rescanned["origin"], rescanned["entries"], rescanned["changes"]) == ("offline", 3, 2)
    assert stop == {"clean": True, "changes_not_journaled": 0, "spool_events": 0}
    # Chained like every event: the trail verifies, and the records are in it.
    code, report, _ = run_verify(daemon.config)
    assert code == 0 and report["trail_events"] == len(read_events(daemon.db, lifecycle=True))


def test_a_killed_run_has_no_stop_and_the_next_start_says_unclean(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    (workspace / "seen.txt").write_text("x")
    wait_for(lambda: daemon.events())
    daemon.kill()  # SIGKILL: no `stop`
    daemon = daemon_factory()
    assert daemon.terminate() == 0
    actions = [(action, d.get("phase"), d.get("previous_run")) for action, d in _lifecycle(daemon)]
    assert actions == [
        ("start", "watching", "none"),
        ("start", "scanned", None),
        ("start", "watching", "unclean"),
        ("start", "scanned", None),
        ("stop", None, None),
    ]


def test_verify_reports_the_ranges_the_trail_vouches_for(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    (workspace / "one.txt").write_text("1")
    wait_for(lambda: daemon.events())
    daemon.kill()
    daemon = daemon_factory()
    (workspace / "two.txt").write_text("2")
    wait_for(lambda: "two.txt" in {e.path for e in daemon.events()})
    assert daemon.terminate() == 0
    every = read_events(daemon.db, lifecycle=True)
    starts = [e.ts for e in every if e.action == "start" and detail_of(e)["phase"] == "watching"]
    [stop] = [e.ts for e in every if e.action == "stop"]
    code, report, _ = run_verify(daemon.config)
    assert code == 0
    [stream] = report["streams"]
    killed_run_last = max(e.ts for e in every if e.ts < starts[1])
    assert stream["coverage"] == [
        {"start": starts[0], "end": killed_run_last, "began": "start", "ended": "unclean"},
        {"start": starts[1], "end": stop, "began": "start", "ended": "stop"},
    ]
    text = subprocess.run(
        [sys.executable, "-m", "codi2", "verify", "--config", str(daemon.config), "--tenant-id", "t1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert f"watched {starts[0]} … {killed_run_last} (from start, to unclean)" in text, text
    assert f"watched {starts[1]} … {stop} (from start, to stop)" in text, text


def test_status_shows_the_start_up_diffs_progress(workspace: Path, daemon_factory: Start) -> None:
    for i in range(20):
        (workspace / f"d{i}").mkdir()
        for j in range(10):
            (workspace / f"d{i}" / f"f{j}").write_text("x")
    daemon = daemon_factory()
    first = daemon.status()["initial_scan_progress"]
    assert first == {"entries_walked": 220, "entries_expected": None, "changes": 220}
    assert daemon.terminate() == 0
    (workspace / "d0" / "f0").unlink()
    daemon = daemon_factory()
    again = daemon.status()["initial_scan_progress"]
    assert again == {"entries_walked": 219, "entries_expected": 220, "changes": 1}
    [done] = daemon.logged("initial_scan_done")
    assert (done["walked"], done["changes"]) == (219, 1)


def test_every_log_line_carries_the_daemon_s_identity(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory(env={"SESSION_ID": "s9"})
    (workspace / "x.txt").write_text("x")
    wait_for(lambda: daemon.events())
    assert daemon.terminate() == 0
    lines = [line for line in daemon.logs if line.get("event") != "raw"]
    assert len(lines) > 5
    bound = {(line.get("tenant_id"), line.get("user_id"), line.get("pod"), line.get("session_id")) for line in lines}
    assert bound == {("t1", "u1", "pod-test", "s9")}, [json.dumps(line) for line in lines[:5]]


def _event(seq: int, action: Action, dest: str | None = None, path: str = "f") -> Event:
    ts = f"2026-01-01T00:00:{seq:02d}.000000Z"
    return Event(
        f"id{seq}", seq, ts, "t1", "u1", None, "pod", action, path, dest, "/ws", "file", None, None, None, None
    )


def test_coverage_is_broken_by_gaps_and_unclean_ends_and_says_so() -> None:
    from codi2.trail.coverage import Coverage

    coverage = Coverage()
    trail = [
        _event(1, "created"),  # before any `start`: a trail older than the records
        _event(2, "start", '{"phase":"watching"}', ""),
        _event(3, "start", '{"phase":"scanned"}', ""),
        _event(4, "created"),
        _event(5, "gap", "inotify_overflow", ""),
        _event(6, "updated"),
        _event(7, "start", '{"phase":"watching","previous_run":"unclean"}', ""),
        _event(8, "created"),
        _event(9, "stop", '{"clean":true}', ""),
    ]
    for e in trail:
        coverage.feed(e)
    assert [(r.start[17:19], r.end[17:19], r.began, r.ended) for r in coverage.ranges()] == [
        ("01", "01", "unknown", "unclean"),
        ("02", "04", "start", "gap:inotify_overflow"),
        ("05", "06", "gap:inotify_overflow", "unclean"),
        ("07", "09", "start", "stop"),
    ]
