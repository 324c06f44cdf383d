"""`codi2 verify --disk` read by a person, with a real daemon, real files and a real `codi2 verify`
process (as `nobody` where a file may not be read): the chain's report always comes first, each difference
says what the trail says and what the disk says, what could not be read is named, and a difference comes
with a hint that it may be a change still in flight (#24, item 5)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import WAIT_S, DaemonProcess, run_codi2, write_config
from trail_checks import nonroot, shared_tmp

Start = Callable[..., DaemonProcess]
HINT = "hint: a change made in the last few seconds may not be committed yet: run again"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12] + "…"


def test_each_difference_says_what_the_trail_and_the_disk_say_and_comes_with_a_hint(
    workspace: Path, daemon_factory: Start
) -> None:
    (workspace / "a.txt").write_text("before")
    (workspace / "gone.txt").write_text("gone")
    daemon = daemon_factory()
    assert daemon.terminate() == 0
    (workspace / "a.txt").write_text("after")  # changes the daemon, stopped, has not seen
    (workspace / "gone.txt").unlink()
    (workspace / "new.txt").write_text("new")
    result = run_codi2("verify", "--config", str(daemon.config), "--tenant-id", "t1", "--disk", str(workspace))
    assert result.returncode == 1 and result.stderr == ""
    lines = [line for line in result.stdout.splitlines() if not line.startswith("  watched ")]  # coverage
    assert lines[0].startswith("stream ") and lines[3].startswith("tenant t1: intact")  # the chain's report
    assert lines[4] == f"disk {workspace} (watch root {workspace}, user -): 2 entries, 3 differ from the trail"
    assert lines[5:] == [
        f"  a.txt: the trail says file sha256 {_sha('before')}, the disk says file sha256 {_sha('after')}",
        f"  gone.txt: the trail says file sha256 {_sha('gone')}, the disk has nothing there",
        f"  new.txt: the trail has nothing there, the disk says file sha256 {_sha('new')}",
        HINT,
    ]


def test_a_retargeted_link_and_a_new_owner_are_named_in_the_difference(workspace: Path, daemon_factory: Start) -> None:
    """verify --disk compares targets and owners, but said "the trail says symlink, the disk says symlink" (and
    the same of a file given to another owner): the one fact that differs was not in the line."""
    (workspace / "link").symlink_to("old\ntarget")
    (workspace / "owned.txt").write_text("same")
    daemon = daemon_factory()
    assert daemon.terminate() == 0
    (workspace / "link").unlink()
    (workspace / "link").symlink_to("new-target")
    os.chown(workspace / "owned.txt", 4242, 4343)
    result = run_codi2("verify", "--config", str(daemon.config), "--tenant-id", "t1", "--disk", str(workspace))
    assert result.returncode == 1 and result.stderr == "", result.stderr
    uid, gid = os.getuid(), os.getgid()
    lines = [line for line in result.stdout.splitlines() if not line.startswith("  watched ")]  # coverage
    disk = next(i for i, line in enumerate(lines) if line.startswith("disk "))
    assert lines[disk + 1 :] == [
        "  link: the trail says symlink to 'old\\ntarget', the disk says symlink to 'new-target'",
        f"  owned.txt: the trail says file sha256 {_sha('same')} owned by {uid}:{gid}, the disk says file sha256"
        f" {_sha('same')} owned by 4242:4343",
        HINT,
    ]


def test_a_disk_that_cannot_be_compared_still_gets_the_chain_report(workspace: Path, daemon_factory: Start) -> None:
    (workspace / "a.txt").write_text("a")
    daemon = daemon_factory()
    assert daemon.terminate() == 0
    missing = workspace / "nowhere"
    result = run_codi2("verify", "--config", str(daemon.config), "--tenant-id", "t1", "--disk", str(missing))
    assert result.returncode == 2
    assert result.stdout.splitlines()[-1].startswith("tenant t1: intact")
    assert result.stderr.count("\n") == 1 and str(missing) in result.stderr


def test_as_a_user_who_may_not_read_a_file_it_is_named_and_the_rest_compared(
    spawned: Callable[[DaemonProcess], DaemonProcess],
) -> None:
    wrapper, why = nonroot()
    if wrapper is None:
        pytest.skip(why)
    base = shared_tmp("codi2-verify-text-")
    try:
        ws = base / "ws"
        ws.mkdir()
        (ws / "open.txt").write_text("anyone may read this")
        (ws / "secret.txt").write_text("root only")
        (ws / "secret.txt").chmod(0o600)
        db = base / "audit.db"
        config = write_config(base / "codi2.toml", ws, db)
        daemon = spawned(DaemonProcess(config, db))
        assert daemon.terminate() == 0
        for p in base.iterdir():
            if p.name.startswith("audit.db"):
                os.chown(p, *(2 * [os.stat(base).st_uid]))
        command = ["verify", "--config", str(config), "--tenant-id", "t1", "--disk", str(ws)]
        result = subprocess.run(
            [*wrapper, sys.executable, "-m", "codi2", *command],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
    finally:
        shutil.rmtree(base)
    assert result.returncode == 0 and result.stderr == "", result
    lines = [line for line in result.stdout.splitlines() if not line.startswith("  watched ")]  # coverage
    assert lines[0].startswith("stream ") and lines[3].startswith("tenant t1: intact")
    assert lines[4].endswith("2 entries, exactly what the trail folds to; 1 could not be read (not compared)")
    assert lines[5:] == [
        "  unreadable: secret.txt: its contents could not be read (not permitted, or past hash_max_bytes)"
    ]
