"""Zero loss, with real processes and files: kill -9 mid-burst, a store outage through a burst, changes
made while the daemon is down, a kernel queue overflow, the watch limit, a torn spool, a full disk."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, disk_state, wait_for
from trail_checks import StoreOutage

from codi2.trail.events import Event
from codi2.trail.replay import fold

Start = Callable[..., DaemonProcess]
WRITER = """
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"w{i // 1000:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}"), "w") as f:
        f.write(str(i))
"""


def _files(n: int) -> set[str]:
    return {f"w{i // 1000:02d}/f{i:05d}" for i in range(n)}


def _created_files(events: list[Event]) -> Counter[str]:
    return Counter(e.path for e in events if e.action == "created" and e.type == "file")


def test_kill_9_mid_burst_loses_and_duplicates_nothing(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(workspace), "20000"])
    wait_for(lambda: len(_created_files(daemon.events())) >= 3000, interval=0.01)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    committed_before = len(_created_files(daemon.events()))
    assert writer.wait(120) == 0
    assert committed_before < 20000  # the kill really came mid-burst

    again = daemon_factory()
    wait_for(lambda: len(_created_files(again.events())) >= 20000, timeout=180)
    assert again.terminate() == 0
    created = _created_files(again.events())
    assert set(created) == _files(20000)
    assert max(created.values()) == 1
    assert fold(again.events()) == disk_state(workspace)


def test_store_outage_during_a_burst(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    (workspace / "before.txt").write_text("x")
    wait_for(lambda: daemon.events())
    outage = StoreOutage(daemon.db)
    try:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(workspace), "5000"])
        saw_degraded = False
        # The outage lasts the whole burst and a retry of the journal's after its back-off: the changes wait
        # in memory meanwhile, and the probes keep answering.
        while writer.poll() is None or not saw_degraded or daemon.status()["store"]["consecutive_failures"] < 2:
            assert daemon.get("/readyz")[0] == 200
            status = daemon.status()
            if status["store"]["state"] == "degraded":
                saw_degraded = True
                assert status["status"] == "degraded" and status["store"]["error_code"] == "SQLITE_BUSY"
            time.sleep(0.5)
        assert writer.wait(60) == 0
    finally:
        outage.end()
    wait_for(lambda: len(_created_files(daemon.events())) >= 5001, timeout=120)
    wait_for(lambda: daemon.status()["status"] == "ok")
    assert daemon.get("/readyz")[0] == 200
    assert daemon.terminate() == 0
    created = _created_files(daemon.events())
    assert set(created) == _files(5000) | {"before.txt"} and max(created.values()) == 1


def test_changes_while_stopped_become_offline_events(workspace: Path, daemon_factory: Start) -> None:
    for name in ("keep.txt", "change.txt", "delete.txt", "replace"):
        (workspace / name).write_text(name)
    env = {"CODI2_MONITORING__INITIAL_SCAN": "record"}
    first = daemon_factory(env=env)
    wait_for(lambda: len(first.events()) >= 4)
    assert {e.origin for e in first.events()} == {"baseline"}  # a first start records what is there
    assert first.terminate() == 0

    (workspace / "new.txt").write_text("new")
    (workspace / "change.txt").write_text("changed content")
    (workspace / "delete.txt").unlink()
    (workspace / "replace").unlink()
    (workspace / "replace").mkdir()
    (workspace / "replace" / "inner.txt").write_text("inner")

    second = daemon_factory(env=env)
    wait_for(lambda: fold(second.events()) == disk_state(workspace))
    assert second.terminate() == 0
    offline = [(e.action, e.path, e.type) for e in second.events()[4:]]
    assert {e.origin for e in second.events()[4:]} == {"offline"}
    assert sorted(offline) == sorted(
        [
            ("created", "new.txt", "file"),
            ("updated", "change.txt", "file"),
            ("deleted", "delete.txt", "file"),
            ("deleted", "replace", "file"),
            ("created", "replace", "dir"),
            ("created", "replace/inner.txt", "file"),
        ]
    )
    assert offline.index(("deleted", "replace", "file")) < offline.index(("created", "replace", "dir"))


def test_first_start_records_the_workspace_so_the_trail_is_complete_from_day_one(
    workspace: Path, daemon_factory: Start
) -> None:
    for i in range(100):
        (workspace / f"old{i}.txt").write_text(f"x{i}")
    (workspace / "sub").mkdir()
    (workspace / "sub" / "deep.txt").write_text("deep")
    daemon = daemon_factory()
    assert fold(daemon.events()) == disk_state(workspace)
    assert {e.origin for e in daemon.events()} == {"baseline"}
    (workspace / "marker.txt").write_text("x")
    wait_for(lambda: "marker.txt" in {e.path for e in daemon.events()})
    assert daemon.terminate() == 0
    again = daemon_factory()
    (workspace / "marker2.txt").write_text("x")
    wait_for(lambda: "marker2.txt" in {e.path for e in again.events()})
    assert again.terminate() == 0
    assert len(again.events()) == 104  # nothing of the baseline recorded twice
    assert fold(again.events()) == disk_state(workspace)


def test_silent_initial_scan_is_the_explicit_old_behaviour(workspace: Path, daemon_factory: Start) -> None:
    for i in range(20):
        (workspace / f"old{i}.txt").write_text("x")
    daemon = daemon_factory(env={"CODI2_MONITORING__INITIAL_SCAN": "silent"})
    (workspace / "marker.txt").write_text("x")
    (workspace / "old3.txt").write_text("changed")
    wait_for(lambda: len(daemon.events()) == 2)
    assert daemon.terminate() == 0
    assert [(e.action, e.path) for e in daemon.events()] == [("created", "marker.txt"), ("updated", "old3.txt")]


def test_queue_overflow_is_recovered_by_a_rescan(workspace: Path, daemon_factory: Start) -> None:
    for i in range(20):
        (workspace / f"w{i:02d}").mkdir()  # watched before the burst, so every file is an inotify event
    daemon = daemon_factory()
    assert daemon.status()["watches"] == 21
    (workspace / "first.txt").write_text("x")
    wait_for(lambda: daemon.events())
    daemon.proc.send_signal(signal.SIGSTOP)  # the reader stalls; the kernel's queue (16,384) overflows
    try:
        subprocess.run([sys.executable, "-c", WRITER, str(workspace), "20000"], check=True)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: len(_created_files(daemon.events())) >= 20001, timeout=180)
    wait_for(lambda: fold(daemon.events()) == disk_state(workspace))
    status = daemon.status()
    assert status["inotify_overflows"] >= 1
    metrics = daemon.get("/metrics")[1]
    assert 'codi2_rescans_total{origin="rescan"}' in metrics
    assert daemon.terminate() == 0
    created = _created_files(daemon.events())
    assert set(created) == _files(20000) | {"first.txt"} and max(created.values()) == 1
    assert any(e.origin == "rescan" for e in daemon.events())
    assert fold(daemon.events()) == disk_state(workspace)


def test_unwatched_directories_are_covered_by_the_periodic_rescan(workspace: Path, daemon_factory: Start) -> None:
    if subprocess.run(["unshare", "-Ur", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare -Ur (user namespaces) not permitted on this machine")
    for i in range(30):
        (workspace / f"d{i:02d}").mkdir()
    wrapper = ("unshare", "-Ur", "sh", "-c", 'echo 12 > /proc/sys/user/max_inotify_watches && exec "$@"', "sh")
    daemon = daemon_factory(wrapper=wrapper, env={"CODI2_MONITORING__RESCAN_INTERVAL_S": "1"})
    unwatched = sorted(Path(p).name for p in daemon.status()["unwatched"])
    assert len(unwatched) == 21  # 12 watches: the barrier directory, the root's parent, the root, 9 of 30
    for name in unwatched[:3]:
        (workspace / name / "written-while-unwatched.txt").write_text(name)
        (workspace / name / "sub").mkdir()
        (workspace / name / "sub" / "deeper.txt").write_text(name)
    expected = {f"{n}/written-while-unwatched.txt" for n in unwatched[:3]} | {
        f"{n}/sub/deeper.txt" for n in unwatched[:3]
    }
    try:
        wait_for(lambda: expected <= set(_created_files(daemon.events())))
    except AssertionError:
        print([(e.action, e.path, e.origin) for e in daemon.events()], daemon.status(), daemon.logs[-30:])
        raise
    assert daemon.terminate() == 0
    assert {e.origin for e in daemon.events() if e.path in expected} == {"rescan"}


def test_directory_moved_out_deletes_everything_below_it(
    workspace: Path, tmp_path: Path, daemon_factory: Start
) -> None:
    daemon = daemon_factory()
    (workspace / "pkg" / "sub").mkdir(parents=True)
    for name in ("pkg/a.txt", "pkg/sub/b.txt", "pkg/sub/c.txt"):
        (workspace / name).write_text(name)
    wait_for(lambda: len(_created_files(daemon.events())) == 3)
    (workspace / "pkg").rename(tmp_path / "elsewhere")
    wait_for(lambda: any(e.action == "deleted" and e.path == "pkg" for e in daemon.events()))
    (tmp_path / "elsewhere" / "sub" / "after.txt").write_text("not ours")
    assert daemon.terminate() == 0
    deleted = [(e.path, e.type) for e in daemon.events() if e.action == "deleted"]
    assert sorted(deleted) == sorted(
        [
            ("pkg", "dir"),
            ("pkg/sub", "dir"),
            ("pkg/a.txt", "file"),
            ("pkg/sub/b.txt", "file"),
            ("pkg/sub/c.txt", "file"),
        ]
    )
    assert deleted[-1] == ("pkg", "dir")  # what was below it first
    assert not [e for e in daemon.events() if "after.txt" in e.path]
    assert fold(daemon.events()) == disk_state(workspace) == {}
