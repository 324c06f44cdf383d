"""Who owns every entry, and where a symlink points (issue #24), with a real daemon on real inotify: `chown`
and `ln -sfn` are `updated` events carrying the new owner and target, the old ones being the entry's state
before (the previous event); the index keeps both, and a rebuild from the store fills them from events."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess
from trail_checks import converge, final_check, lagging, run_verify

from codi2.trail.events import Event
from codi2.trail.replay import fold_events

Start = Callable[..., DaemonProcess]
LAG = pytest.mark.parametrize("lag", [True, False], ids=["lagging", "keeping-up"])
OTHER = 1234  # an owner no test runner is

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another owner needs root")


def _maybe_lagging(daemon: DaemonProcess, lag: bool) -> contextlib.AbstractContextManager[None]:
    return lagging(daemon) if lag else contextlib.nullcontext()


def _history(events: list[Event], path: str) -> list[Event]:
    return [e for e in events if e.path == path and e.action != "gap"]


@LAG
def test_chown_is_an_updated_with_the_new_owner_of_a_file_a_directory_and_a_symlink(
    workspace: Path, daemon_factory: Start, lag: bool
) -> None:
    ws = workspace
    (ws / "f").write_text("content")
    (ws / "d").mkdir()
    (ws / "l").symlink_to("f")
    me = os.getuid(), os.getgid()
    daemon = daemon_factory()
    first = converge(daemon, ws)
    assert {(e.path, e.uid, e.gid) for e in first if e.action == "created"} >= {("f", *me), ("d", *me), ("l", *me)}
    with _maybe_lagging(daemon, lag):
        os.chown(ws / "f", OTHER, OTHER)
        os.chown(ws / "d", OTHER, me[1])
        os.lchown(ws / "l", me[0], OTHER)
    events = converge(daemon, ws)
    for path, owner in (("f", (OTHER, OTHER)), ("d", (OTHER, me[1])), ("l", (me[0], OTHER))):
        *before, last = _history(events, path)
        assert (last.action, (last.uid, last.gid)) == ("updated", owner), path
        assert (before[-1].uid, before[-1].gid) == me  # the old owner: the entry's state before
        assert last.sha256 == before[-1].sha256 and last.size == before[-1].size
    final_check(daemon, ws)


@LAG
def test_retargeting_a_symlink_is_an_updated_with_its_target_kept_as_bytes(
    workspace: Path, daemon_factory: Start, lag: bool
) -> None:
    ws = workspace
    (ws / "a").write_text("a")
    (ws / "l").symlink_to("a")
    daemon = daemon_factory()
    first = converge(daemon, ws)
    assert [e.target for e in _history(first, "l")] == ["a"]
    odd = b"caf\xe9-\xff"  # a target is any bytes, like a name
    with _maybe_lagging(daemon, lag):
        subprocess.run(["ln", "-sfn", "b", str(ws / "l")], check=True)  # the same length: only the target differs
    events = converge(daemon, ws)
    assert [(e.action, e.target) for e in _history(events, "l")][-1] == ("updated", "b")
    with _maybe_lagging(daemon, lag):
        os.unlink(ws / "l")
        os.symlink(odd, os.fsencode(ws / "l"))
    events = converge(daemon, ws)
    last = _history(events, "l")[-1]
    assert (last.action, last.type, os.fsencode(last.target or "")) == ("updated", "symlink", odd)
    assert f'"target":"{os.fsdecode(odd)}"'.encode("ascii", "backslashreplace") in last.to_json().encode()
    final_check(daemon, ws)


def test_an_owner_changed_while_the_daemon_was_down_after_the_index_was_rebuilt_from_the_store(
    workspace: Path, daemon_factory: Start
) -> None:
    """A journal lost with the state directory: the index comes back from the store's events, owners
    included, so a chown made meanwhile is still an `updated` (with no owner in the index it would be
    taken for a fact never known, and absorbed)."""
    ws = workspace
    (ws / "f").write_text("content")
    daemon = daemon_factory()
    converge(daemon, ws)
    assert daemon.terminate() == 0
    shutil.rmtree(ws / ".codi2")
    os.chown(ws / "f", OTHER, OTHER)
    again = daemon_factory()
    events = converge(again, ws)
    last = _history(events, "f")[-1]
    assert (last.action, last.uid, last.gid, last.origin) == ("updated", OTHER, OTHER, "offline")
    final_check(again, ws)


def test_verify_disk_compares_owners_and_targets(workspace: Path, daemon_factory: Start) -> None:
    ws = workspace
    (ws / "f").write_text("content")
    (ws / "l").symlink_to("f")
    daemon = daemon_factory()
    converge(daemon, ws)
    assert daemon.terminate() == 0
    code, report, stderr = run_verify(daemon.config, "--disk", str(ws))
    assert code == 0 and report["disk"]["differences"] == [], stderr
    os.chown(ws / "f", OTHER, OTHER)
    os.unlink(ws / "l")
    os.symlink("g", ws / "l")
    code, report, stderr = run_verify(daemon.config, "--disk", str(ws))
    assert code == 1, stderr
    found = {x["path"]: (x["kind"], x["trail"], x["disk"]) for x in report["disk"]["differences"]}
    assert found.keys() == {"f", "l"}
    assert (found["f"][1]["uid"], found["f"][2]["uid"], found["f"][2]["gid"]) == (os.getuid(), OTHER, OTHER)
    assert (found["l"][1]["target"], found["l"][2]["target"]) == ("f", "g")


@LAG
def test_an_entry_changed_then_renamed_in_one_window_folds_to_its_new_owner_and_target(
    workspace: Path, daemon_factory: Start, lag: bool
) -> None:
    """The `moved` event carries what the rename found; a fold takes the owner and target from it, not only
    from the entry's event before the rename."""
    ws = workspace
    (ws / "d").mkdir()
    (ws / "d" / "f").write_text("inside")
    (ws / "l").symlink_to("a")
    daemon = daemon_factory()
    converge(daemon, ws)
    with _maybe_lagging(daemon, lag):
        os.chown(ws / "d", OTHER, OTHER)
        (ws / "d").rename(ws / "d2")
        os.unlink(ws / "l")
        os.symlink("b", ws / "l")
        os.lchown(ws / "l", OTHER, OTHER)
        (ws / "l").rename(ws / "l2")
    events = final_check(daemon, ws)
    assert fold_events(events)[(str(ws), "d2")].uid == OTHER
    assert fold_events(events)[(str(ws), "l2")].target == "b"
