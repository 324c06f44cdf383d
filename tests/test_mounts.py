"""Mounts inside a watch root (issue #22, defect 5): a tmpfs over a populated directory, a bind mount of an
outside directory, a bind mount over one file. inotify says nothing of a mount, so before the fix the
trail differed from the disk for as long as the mount existed, with `/status` ok. The trail records what
the path shows: a mount appearing is a `gap` (cause `mount_changed`), `deleted` for the covered entries
and `created` for the mount's, and the reverse on unmount. Real mounts, so root only: skipped with the
reason where `mount` is refused. Every mount is lazily unmounted in `finally`.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess, wait_for
from trail_checks import converge, ever_named, final_check, lagging, mount_tmpfs, umount

from codi2.trail.events import Event

LAG = pytest.mark.parametrize("lag", [True, False], ids=["lagging", "keeping-up"])
Start = Callable[..., DaemonProcess]


@contextlib.contextmanager
def mounted(*args: str, target: Path) -> Iterator[None]:
    """`mount ARGS TARGET` for the block (skipped with the reason if refused), `umount -l` after."""
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} not permitted here: {result.stderr.strip()}")
    try:
        yield
    finally:
        umount(target)


def _mount_gaps(events: list[Event]) -> int:
    return sum(1 for e in events if e.action == "gap" and e.dest_path == "mount_changed")


def _maybe_lagging(daemon: DaemonProcess, lag: bool) -> contextlib.AbstractContextManager[None]:
    return lagging(daemon) if lag else contextlib.nullcontext()


@LAG
def test_a_tmpfs_over_a_populated_directory_and_its_unmount(workspace: Path, daemon_factory: Start, lag: bool) -> None:
    ws = workspace
    (ws / "data" / "covered").mkdir(parents=True)
    (ws / "data" / "covered" / "old.txt").write_text("covered by the mount\n")
    daemon = daemon_factory()
    reason = None
    with _maybe_lagging(daemon, lag):
        reason = mount_tmpfs(ws / "data", "4m")
    if reason is not None:
        pytest.skip(reason)
    try:
        (ws / "data" / "on-tmpfs").mkdir()
        (ws / "data" / "on-tmpfs" / "new.txt").write_text("on the tmpfs\n")
        events = converge(daemon, ws)
        assert _mount_gaps(events) >= 1
        assert {"data/covered/old.txt", "data/on-tmpfs/new.txt"} <= ever_named(events)
        (ws / "data" / "on-tmpfs" / "live.txt").write_text("the tmpfs is watched\n")
        converge(daemon, ws)
    finally:
        with _maybe_lagging(daemon, lag):
            umount(ws / "data")
    (ws / "data" / "covered" / "after.txt").write_text("the covered directory is watched again\n")
    events = converge(daemon, ws)
    assert _mount_gaps(events) >= 2
    final_check(daemon, ws)


def test_a_bind_mount_of_an_outside_directory(workspace: Path, tmp_path: Path, daemon_factory: Start) -> None:
    ws, outside = workspace, tmp_path / "outside"
    (outside / "nested").mkdir(parents=True)
    (outside / "nested" / "o.txt").write_text("outside\n")
    (ws / "mnt").mkdir()
    (ws / "mnt" / "hidden.txt").write_text("hidden by the bind mount\n")
    daemon = daemon_factory()
    with mounted("--bind", str(outside), target=ws / "mnt"):
        events = converge(daemon, ws)
        assert _mount_gaps(events) == 1
        (outside / "nested" / "written-outside.txt").write_text("seen through the bind mount\n")
        (ws / "mnt" / "written-inside.txt").write_text("inside\n")
        converge(daemon, ws)
    converge(daemon, ws)
    final_check(daemon, ws)


def test_a_bind_mount_over_one_file(workspace: Path, tmp_path: Path, daemon_factory: Start) -> None:
    ws, source = workspace, tmp_path / "source.txt"
    source.write_text("the mounted content\n")
    (ws / "dir").mkdir()
    (ws / "dir" / "f.txt").write_text("the covered content\n")
    daemon = daemon_factory()
    with mounted("--bind", str(source), target=ws / "dir" / "f.txt"):
        events = converge(daemon, ws)
        assert _mount_gaps(events) == 1
    events = converge(daemon, ws)
    assert _mount_gaps(events) == 2
    final_check(daemon, ws)


def test_a_root_that_is_a_mount_point_lazily_unmounted(
    tmp_path: Path, spawned: Callable[[DaemonProcess], DaemonProcess]
) -> None:
    """The daemon holds the root's descriptor, so `umount` says EBUSY; `umount -l` detaches it, and the
    path shows the covered directory: the root is replaced, diffed and watched there."""
    from conftest import write_config

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "covered.txt").write_text("under the mount\n")
    reason = mount_tmpfs(ws, "4m")
    if reason is not None:
        pytest.skip(reason)
    try:
        (ws / "on-tmpfs.txt").write_text("on the tmpfs\n")
        db = tmp_path / "audit.db"
        config = write_config(tmp_path / "codi2.toml", ws, db)
        daemon = spawned(DaemonProcess(config, db, {"CODI2_STATE__DIR": str(tmp_path / "state")}))
        busy = subprocess.run(["umount", str(ws)], capture_output=True, text=True, check=False)
        assert busy.returncode != 0 and "busy" in busy.stderr, busy
    finally:
        umount(ws)
    wait_for(lambda: daemon.status()["status"] == "ok" and "covered.txt" in ever_named(daemon.events()))
    (ws / "live.txt").write_text("watched\n")
    events = converge(daemon, ws)
    assert "on-tmpfs.txt" in ever_named(events)
    final_check(daemon, ws)


def test_files_whose_read_fails_cost_no_other_change_its_record(workspace: Path, daemon_factory: Start) -> None:
    """A process's /proc directory bind-mounted into a root: some of its files fail read() (pagemap with
    EINVAL, mem with EIO). That error failed the whole flush as a journal error, retried for ever: nothing
    else was recorded (a file written beside it neither) and /status blamed the journal. Now such a file is
    recorded with its stat and no hash, as a file past hash_max_bytes is."""
    ws = workspace
    (ws / "proc").mkdir()
    daemon = daemon_factory()
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        with mounted("--bind", f"/proc/{sleeper.pid}", target=ws / "proc"):
            (ws / "beside.txt").write_text("written beside the mount\n")
            wait_for(lambda: {"beside.txt", "proc/pagemap"} <= {e.path for e in daemon.events()})
            facts = {e.path: e for e in daemon.events() if e.action == "created"}
            assert facts["proc/pagemap"].type == "file" and facts["proc/pagemap"].sha256 is None
            assert not [r for r in daemon.status()["degraded_reasons"] if "journal" in r]
    finally:
        sleeper.kill()
        sleeper.wait()
    final_check(daemon, ws)
