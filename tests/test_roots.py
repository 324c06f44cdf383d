"""A watch root removed, replaced or renamed away while the daemon runs (issue #22, defect 4).

The daemon holds each root by a descriptor, so the kernel never says IN_DELETE_SELF for it: before the
fix a root removed and made again was silently unwatched until a restart, with `/status` ok, and a root
renamed away went on being recorded under its old path. Each test runs the real daemon on a real tree,
lagging (SIGSTOPped around the operations) and keeping up, and ends with the trail folded equal to the
disk. The state dir is outside the root, as in a pod, so removing the root leaves the daemon's own files.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, wait_for, write_config
from trail_checks import converge, ever_named, final_check, lagging, metric

from codi2.trail.events import Event
from codi2.trail.replay import fold

LAG = pytest.mark.parametrize("lag", [True, False], ids=["lagging", "keeping-up"])
Start = Callable[..., DaemonProcess]


@pytest.fixture
def start(tmp_path: Path, spawned: Callable[[DaemonProcess], DaemonProcess]) -> Start:
    """A daemon on `root` (created here), its state dir beside it; `check_s` is the periodic root check."""

    def run(root: Path, check_s: float = 3600.0) -> DaemonProcess:
        root.mkdir(parents=True, exist_ok=True)
        db = tmp_path / "audit.db"
        config = write_config(tmp_path / "codi2.toml", root, db)
        env = {"CODI2_STATE__DIR": str(tmp_path / "state"), "CODI2_MONITORING__RESCAN_INTERVAL_S": str(check_s)}
        return spawned(DaemonProcess(config, db, env))

    return run


def _maybe_lagging(daemon: DaemonProcess, lag: bool) -> contextlib.AbstractContextManager[None]:
    return lagging(daemon) if lag else contextlib.nullcontext()


def _gone_reason(root: Path) -> str:
    return f"watch root gone: {root}"


def _wait_gone(daemon: DaemonProcess, root: Path) -> None:
    """Reported gone: degraded, still ready (the IDE must not break), the gauge at 1."""
    wait_for(lambda: _gone_reason(root) in daemon.status()["degraded_reasons"])
    assert daemon.get("/readyz")[0] == 200
    assert metric(daemon.get("/metrics")[1], "codi2_watch_roots_gone") == 1


def _wait_back(daemon: DaemonProcess, root: Path, times: int = 1) -> None:
    wait_for(lambda: _gone_reason(root) not in daemon.status()["degraded_reasons"])
    wait_for(lambda: metric(daemon.get("/metrics")[1], "codi2_watch_roots_reestablished_total") >= times)
    assert metric(daemon.get("/metrics")[1], "codi2_watch_roots_gone") == 0
    assert daemon.status()["status"] == "ok", daemon.status()


def _wait_nothing_under(daemon: DaemonProcess, root: Path) -> list[Event]:
    """The root's path holds nothing: the trail folds to nothing under it."""
    wait_for(lambda: not [key for key in fold(daemon.events()) if key[0] == str(root)])
    return daemon.events()


def _gaps(events: list[Event]) -> list[str | None]:
    return [e.dest_path for e in events if e.action == "gap"]


def _populate(root: Path) -> None:
    (root / "a.txt").write_text("a\n")
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "deep" / "b.txt").write_text("b\n")


@LAG
def test_a_root_removed_and_made_again_is_watched_again(tmp_path: Path, start: Start, lag: bool) -> None:
    ws = tmp_path / "ws"
    daemon = start(ws)
    _populate(ws)
    converge(daemon, ws)
    with _maybe_lagging(daemon, lag):
        shutil.rmtree(ws)
        if lag:  # made again before the daemon looks: a replaced root
            ws.mkdir()
            (ws / "made-while-lagging").write_text("x\n")
    if not lag:
        _wait_gone(daemon, ws)
        _wait_nothing_under(daemon, ws)
        ws.mkdir()
        (ws / "made-after").write_text("y\n")
    _wait_back(daemon, ws)
    (ws / "live" / "er").mkdir(parents=True)  # watched again: live changes, in new directories too
    (ws / "live" / "er" / "c.txt").write_text("c\n")
    events = converge(daemon, ws)
    assert "root_replaced" in _gaps(events), _gaps(events)
    assert {"live/er/c.txt", "made-while-lagging" if lag else "made-after"} <= ever_named(events)
    assert daemon.status()["watches"] == 3  # the root, live, live/er
    final_check(daemon, ws)


@LAG
def test_a_root_renamed_away_is_no_longer_recorded_under_its_path(tmp_path: Path, start: Start, lag: bool) -> None:
    ws, away = tmp_path / "ws", tmp_path / "ws.old"
    daemon = start(ws)
    _populate(ws)
    converge(daemon, ws)
    with _maybe_lagging(daemon, lag):
        ws.rename(away)
        (away / "written-after-the-rename").write_text("not at ws any more\n")
        (away / "sub" / "deep" / "b.txt").write_text("changed after the rename\n")
    _wait_gone(daemon, ws)
    (away / "later").write_text("later\n")
    (away / "sub" / "later-dir").mkdir()
    events = _wait_nothing_under(daemon, ws)
    assert "root_gone" in _gaps(events), _gaps(events)
    assert not {"written-after-the-rename", "later", "sub/later-dir"} & ever_named(events), ever_named(events)
    ws.mkdir()
    (ws / "fresh").write_text("fresh\n")
    _wait_back(daemon, ws)
    (away / "still-not-recorded").write_text("z\n")
    (ws / "live").write_text("live\n")
    events = converge(daemon, ws)
    assert "still-not-recorded" not in ever_named(events)
    final_check(daemon, ws)


@LAG
def test_a_root_replaced_by_another_directory_is_diffed_against_it(tmp_path: Path, start: Start, lag: bool) -> None:
    ws, other = tmp_path / "ws", tmp_path / "other"
    daemon = start(ws)
    _populate(ws)
    other.mkdir()
    (other / "a.txt").write_text("other a\n")
    (other / "only-in-other").write_text("o\n")
    converge(daemon, ws)
    with _maybe_lagging(daemon, lag):
        ws.rename(tmp_path / "ws.old")
        other.rename(ws)
    _wait_back(daemon, ws)
    (ws / "after").write_text("after\n")
    events = converge(daemon, ws)
    assert "root_replaced" in _gaps(events), _gaps(events)
    actions = {(e.action, e.path) for e in events}
    assert {("created", "only-in-other"), ("updated", "a.txt"), ("deleted", "sub/deep/b.txt")} <= actions
    final_check(daemon, ws)


def test_a_root_whose_ancestor_is_renamed_is_found_by_the_periodic_check(tmp_path: Path, start: Start) -> None:
    """No event names a root whose grandparent was renamed: the check every rescan_interval_s finds it."""
    ws = tmp_path / "a" / "b" / "ws"
    daemon = start(ws, check_s=1.0)
    _populate(ws)
    converge(daemon, ws)
    (tmp_path / "a").rename(tmp_path / "a2")
    _wait_gone(daemon, ws)
    _wait_nothing_under(daemon, ws)
    ws.mkdir(parents=True)
    (ws / "back").write_text("back\n")
    _wait_back(daemon, ws)
    events = converge(daemon, ws)
    assert _gaps(events)[-2:] == ["root_gone", "root_replaced"], _gaps(events)
    final_check(daemon, ws)
