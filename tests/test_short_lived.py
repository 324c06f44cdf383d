"""Short-lived directories (issue 24): a directory the kernel reported is in the trail, even when it was
gone before anyone could look into it, with its `created` before and its `deleted` after its children's.

The real daemon on a real tree; where the case is about lag, the daemon is stopped (SIGSTOP) around the
operations, so everything lands in one window. Tests wait on conditions, never on sleeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, wait_for
from trail_checks import assert_no_defects, describe, final_check, history, lagging

Start = Callable[..., DaemonProcess]
# The default batch window (the tests' config has 50 ms): short-lived entries live within one window.
DEFAULT_WINDOW = {"CODI2_BATCHING__MAX_DELAY_MS": "200"}
LAG = pytest.mark.parametrize("lag", [True, False], ids=["lagging", "keeping-up"])


def _maybe_lagging(daemon: DaemonProcess, lag: bool) -> contextlib.AbstractContextManager[None]:
    return lagging(daemon) if lag else contextlib.nullcontext()


def _short_lived(parent: Path, name: str, pause: float) -> None:
    """mkdir NAME; echo secret > NAME/data; rm -r NAME, `pause` seconds between the steps."""
    (parent / name).mkdir()
    time.sleep(pause)
    (parent / name / "data").write_text("secret")
    time.sleep(pause)
    shutil.rmtree(parent / name)


def _marked(daemon: DaemonProcess, ws: Path, name: str = "marker") -> None:
    """A marker written after the operations, waited for: the trail has whatever came before it."""
    (ws / name).write_text("after")
    wait_for(lambda: name in {e.path for e in daemon.events()})


@LAG
def test_a_directory_created_and_removed_at_once_is_recorded_every_time(
    workspace: Path, daemon_factory: Start, lag: bool
) -> None:
    (workspace / "keep").mkdir()
    daemon = daemon_factory()
    wait_for(lambda: "keep" in {e.path for e in daemon.events()})
    with _maybe_lagging(daemon, lag):
        for i in range(6):
            _short_lived(workspace / "keep", "q", 0)
            time.sleep(0.6)
            if not lag:  # each in a window of its own: the next starts once the marker is committed
                _marked(daemon, workspace, f"marker{i}")
    _marked(daemon, workspace)
    events = final_check(daemon, workspace)
    q = history(events, "keep/q")
    assert q, describe(events)
    # Every appearance the trail has is a created-deleted pair, in that order.
    assert q == [("created", None), ("deleted", None)] * (len(q) // 2), q
    if not lag:  # the kernel reported each of the six; a lagging reader gets them in one window
        assert len(q) == 12, describe(events)


@LAG
def test_a_directory_that_held_a_file_for_moments_is_recorded_around_it(
    workspace: Path, daemon_factory: Start, lag: bool
) -> None:
    (workspace / "keep").mkdir()
    daemon = daemon_factory(env=DEFAULT_WINDOW)
    wait_for(lambda: "keep" in {e.path for e in daemon.events()})
    with _maybe_lagging(daemon, lag):
        _short_lived(workspace / "keep", "exfil", 0.05)
    _marked(daemon, workspace)
    events = final_check(daemon, workspace)
    named = [(e.action, e.path) for e in events if e.path.startswith("keep/exfil")]
    assert ("created", "keep/exfil") in named, describe(events)
    assert named[0] == ("created", "keep/exfil") and named[-1] == ("deleted", "keep/exfil"), named


@LAG
def test_a_tree_created_and_removed_within_one_window(workspace: Path, daemon_factory: Start, lag: bool) -> None:
    """mkdir -p a/b; write a/a and a/b/f; rm -r a: each directory's pair around its children's."""
    daemon = daemon_factory(env=DEFAULT_WINDOW)
    with _maybe_lagging(daemon, lag):
        (workspace / "a" / "b").mkdir(parents=True)
        (workspace / "a" / "a").write_text("a")
        (workspace / "a" / "b" / "f").write_text("f")
        shutil.rmtree(workspace / "a")
    _marked(daemon, workspace)
    events = final_check(daemon, workspace)
    named = [(e.action, e.path) for e in events if e.path == "a" or e.path.startswith("a/")]
    assert named[0] == ("created", "a") and named[-1] == ("deleted", "a"), named
    assert_no_defects(events)


@LAG
def test_a_directory_renamed_away_and_back(workspace: Path, daemon_factory: Start, lag: bool, tmp_path: Path) -> None:
    """mkdir d; mv d outside the tree; mv it back; rm -r d: the trail has d, and ends without it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    daemon = daemon_factory()
    with _maybe_lagging(daemon, lag):
        (workspace / "d").mkdir()
        (workspace / "d" / "f").write_text("f")
        os.rename(workspace / "d", outside / "d")
        os.rename(outside / "d", workspace / "d")
        shutil.rmtree(workspace / "d")
    _marked(daemon, workspace)
    events = final_check(daemon, workspace)
    d = history(events, "d")
    assert d[0] == ("created", None) and d[-1] == ("deleted", None), d
