"""The watcher on real inotify and real temp trees. `barrier()` makes every check exact, not timed.

Lag is real too: `lagging()` holds the handler thread (the kernel keeps queueing) while the disk changes,
as a SIGSTOP of the daemon would, then lets it read everything it missed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from codi2.disk.ignore import IgnoreRules
from codi2.watch.hints import Hint, Move, Rescan, Touch
from codi2.watch.watcher import Watcher

IGNORES = [".git", "node_modules", "target", "dist"]


class Collector:
    def __init__(self) -> None:
        self.hints: list[Hint] = []
        self.lock = threading.Lock()

    def __call__(self, hints: list[Hint]) -> None:
        with self.lock:
            self.hints.extend(hints)

    def take(self) -> list[Hint]:
        with self.lock:
            out, self.hints = self.hints, []
        return out

    def touched(self) -> set[bytes]:
        return {h.path for h in self.take() if isinstance(h, Touch)}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    return root


@pytest.fixture
def started(ws: Path, tmp_path: Path) -> Iterator[tuple[Watcher, Collector]]:
    collector = Collector()
    watcher = Watcher([ws], IgnoreRules(IGNORES), tmp_path / "state" / "barrier", on_hints=collector)
    watcher.start()
    yield watcher, collector
    watcher.stop()


@contextlib.contextmanager
def lagging(watcher: Watcher) -> Iterator[None]:
    """The handler thread stops handling (the kernel queue fills) until the block ends."""
    gate = threading.Event()
    entered = threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(30)

    watcher.request(hold)
    assert entered.wait(10)
    try:
        yield
    finally:
        gate.set()


def watched_paths(watcher: Watcher) -> dict[bytes, int]:
    """Every attached watched directory by path, with its inode (from the watcher's own tree)."""
    return {where: node.ino for where, node in watcher._tree.watched_paths().items()}


def assert_watches_match_disk(watcher: Watcher, ws: Path) -> None:
    """Every non-ignored directory on disk is watched under its path, with its inode, and nothing else."""
    expected = {b"": os.stat(ws).st_ino}
    for dirpath, dirnames, _ in os.walk(os.fsencode(ws)):
        dirnames[:] = [d for d in dirnames if os.fsdecode(d) not in IGNORES]
        for d in dirnames:
            full = os.path.join(dirpath, d)
            expected[os.path.relpath(full, os.fsencode(ws))] = os.lstat(full).st_ino
    assert watched_paths(watcher) == expected


def test_ignored_trees_get_no_watches(ws: Path, tmp_path: Path) -> None:
    for i in range(20):
        (ws / "src" / f"d{i}").mkdir(parents=True)
        (ws / "node_modules" / f"pkg{i}" / "lib").mkdir(parents=True)
        (ws / "src" / f"d{i}" / "node_modules" / "x").mkdir(parents=True)
    (ws / ".git" / "objects").mkdir(parents=True)
    watcher = Watcher([ws], IgnoreRules(IGNORES), tmp_path / "b", on_hints=Collector())
    watcher.start()
    try:
        assert watcher.state.watches == 1 + 1 + 20  # root, src, src/d*
    finally:
        watcher.stop()


def test_file_lifecycle_hints_in_kernel_order(ws: Path, started: tuple[Watcher, Collector]) -> None:
    watcher, collector = started
    (ws / "a.txt").write_text("one")
    (ws / "a.txt").rename(ws / "b.txt")
    (ws / "b.txt").unlink()
    assert watcher.barrier()
    seen = collector.take()
    assert seen[0] == Touch(0, b"a.txt", created=True)
    assert Move(0, b"a.txt", b"b.txt", False, None) in seen
    assert seen[-1] == Touch(0, b"b.txt")


def test_new_directory_contents_are_watched(ws: Path, started: tuple[Watcher, Collector]) -> None:
    watcher, collector = started
    script = (
        "import os, sys\n"
        "root = sys.argv[1]\n"
        "for d in range(10):\n"
        "    p = os.path.join(root, 'n', str(d), 'deep')\n"
        "    os.makedirs(p)\n"
        "    for f in range(30):\n"
        "        open(os.path.join(p, f'f{f}'), 'w').close()\n"
    )
    subprocess.run([sys.executable, "-c", script, str(ws)], check=True)
    assert watcher.barrier()
    assert b"n" in collector.touched()
    assert_watches_match_disk(watcher, ws)
    (ws / "n" / "3" / "deep" / "late.txt").write_text("x")
    assert watcher.barrier()
    assert b"n/3/deep/late.txt" in collector.touched()


def test_directory_rename_is_one_move_of_a_verified_node(ws: Path, started: tuple[Watcher, Collector]) -> None:
    (ws / "old" / "sub").mkdir(parents=True)
    watcher, collector = started
    watcher.barrier()
    collector.take()
    (ws / "old").rename(ws / "new")
    (ws / "new" / "sub" / "f.txt").write_text("x")
    assert watcher.barrier()
    seen = collector.take()
    assert seen[0] == Move(0, b"old", b"new", True, os.stat(ws / "new").st_ino)
    assert Touch(0, b"new/sub/f.txt", created=True) in seen
    assert_watches_match_disk(watcher, ws)


def test_rename_then_recreate_while_lagging(ws: Path, started: tuple[Watcher, Collector]) -> None:
    """The issue's case 1: mkdir d; mv d e; mkdir d while the watcher is behind, then write into e."""
    watcher, collector = started
    with lagging(watcher):
        (ws / "d").mkdir()
        (ws / "d").rename(ws / "e")
        (ws / "d").mkdir()
    assert watcher.barrier()
    assert watcher.barrier()  # the recrawl of what it could not vouch for happens at a barrier
    assert_watches_match_disk(watcher, ws)
    collector.take()
    (ws / "e" / "f").write_text("x")
    (ws / "d" / "g").write_text("y")
    assert watcher.barrier()
    touched = collector.touched()
    assert {b"e/f", b"d/g"} <= touched
    assert b"e/g" not in touched and b"d/f" not in touched


def test_swap_through_a_temporary_name_while_lagging(ws: Path, started: tuple[Watcher, Collector]) -> None:
    (ws / "a").mkdir()
    (ws / "b").mkdir()
    watcher, collector = started
    with lagging(watcher):
        (ws / "a").rename(ws / "tmp")
        (ws / "b").rename(ws / "a")
        (ws / "tmp").rename(ws / "b")
    watcher.barrier()
    watcher.barrier()
    assert_watches_match_disk(watcher, ws)
    collector.take()
    (ws / "a" / "in-a").write_text("1")
    (ws / "b" / "in-b").write_text("2")
    assert watcher.barrier()
    assert {b"a/in-a", b"b/in-b"} <= collector.touched()


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # RENAME_EXCHANGE
        raise OSError(ctypes.get_errno(), "renameat2")


@pytest.mark.parametrize("lag", [False, True])
def test_rename_exchange_of_two_directories(ws: Path, started: tuple[Watcher, Collector], lag: bool) -> None:
    (ws / "x" / "deep").mkdir(parents=True)
    (ws / "y").mkdir()
    watcher, collector = started
    with lagging(watcher) if lag else contextlib.nullcontext():
        _exchange(ws / "x", ws / "y")
    watcher.barrier()
    watcher.barrier()
    assert_watches_match_disk(watcher, ws)
    collector.take()
    (ws / "y" / "deep" / "f").write_text("1")
    (ws / "x" / "g").write_text("2")
    assert watcher.barrier()
    assert {b"y/deep/f", b"x/g"} <= collector.touched()


def test_directory_replaced_while_a_process_holds_it_as_cwd(ws: Path, started: tuple[Watcher, Collector]) -> None:
    """The issue's case 2: rm -rf build && mkdir build, the old build still someone's working directory."""
    (ws / "build").mkdir()
    watcher, collector = started
    holder = subprocess.Popen(["sleep", "30"], cwd=ws / "build")
    try:
        (ws / "build").rmdir()
        (ws / "build").mkdir()
        assert watcher.barrier()
        collector.take()
        (ws / "build" / "out.o").write_text("x")
        assert watcher.barrier()
        assert b"build/out.o" in collector.touched()
        assert_watches_match_disk(watcher, ws)
    finally:
        holder.kill()
        holder.wait()
    assert watcher.barrier()  # the late IN_IGNORED of the old directory changes nothing
    assert_watches_match_disk(watcher, ws)


def test_directory_moved_out_loses_its_watches(ws: Path, tmp_path: Path, started: tuple[Watcher, Collector]) -> None:
    (ws / "pkg" / "deep").mkdir(parents=True)
    outside = tmp_path / "outside"
    watcher, collector = started
    watcher.barrier()
    collector.take()
    assert watcher.state.watches == 3
    (ws / "pkg").rename(outside)
    assert watcher.barrier()
    assert collector.take() == [Touch(0, b"pkg")]
    assert watcher.state.watches == 1
    (outside / "deep" / "after.txt").write_text("not ours any more")
    assert watcher.barrier()
    assert collector.take() == []


def test_directory_moved_in_is_watched(ws: Path, tmp_path: Path, started: tuple[Watcher, Collector]) -> None:
    outside = tmp_path / "incoming"
    (outside / "inner").mkdir(parents=True)
    watcher, collector = started
    outside.rename(ws / "incoming")
    assert watcher.barrier()
    assert collector.take()[0] == Touch(0, b"incoming", created=True, is_dir=True)
    (ws / "incoming" / "inner" / "g.txt").write_text("y")
    assert watcher.barrier()
    assert b"incoming/inner/g.txt" in collector.touched()


def test_rename_into_an_ignored_name_leaves_the_tree(ws: Path, started: tuple[Watcher, Collector]) -> None:
    (ws / "build").mkdir()
    watcher, collector = started
    watcher.barrier()
    collector.take()
    (ws / "build").rename(ws / "dist")
    assert watcher.barrier()
    assert collector.take() == [Touch(0, b"build")]
    assert watcher.state.watches == 1


def test_path_dependent_rules_rewatch_a_renamed_tree(ws: Path, tmp_path: Path) -> None:
    """With an anchored pattern (`logs/cache`), renaming a directory changes what is ignored below it."""
    (ws / "logs" / "cache").mkdir(parents=True)
    (ws / "x" / "cache").mkdir(parents=True)
    collector = Collector()
    watcher = Watcher([ws], IgnoreRules(["logs/cache"]), tmp_path / "b", on_hints=collector)
    watcher.start()
    try:
        assert set(watched_paths(watcher)) == {b"", b"logs", b"x", b"x/cache"}
        (ws / "logs").rename(ws / "old-logs")
        (ws / "x").rename(ws / "logs")
        watcher.barrier()
        watcher.barrier()
        assert set(watched_paths(watcher)) == {b"", b"old-logs", b"old-logs/cache", b"logs"}
    finally:
        watcher.stop()


def test_hostile_names_and_depth_past_path_max(ws: Path, started: tuple[Watcher, Collector]) -> None:
    watcher, collector = started
    raw = os.fsencode(ws) + b"/caf\xe9-\xff.txt"
    with open(raw, "wb") as f:
        f.write(b"x")
    (ws / "new\nline.txt").write_text("y")
    fd = os.open(ws, os.O_RDONLY)
    for _ in range(30):  # 30 x 200 bytes: far deeper than PATH_MAX
        os.mkdir("d" * 200, dir_fd=fd)
        fd, parent = os.open("d" * 200, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    with open(os.open("deepest.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
        f.write("z")
    os.close(fd)
    (ws / "loop").symlink_to(ws, target_is_directory=True)
    assert watcher.barrier()
    touched = collector.touched()
    assert {b"caf\xe9-\xff.txt", b"new\nline.txt", b"loop"} <= touched
    deepest = b"/".join([b"d" * 200] * 30) + b"/deepest.txt"
    assert len(deepest) > 4096
    assert watcher.state.watches == 1 + 30 and not watcher.state.unwatched
    fd = os.open(ws, os.O_RDONLY)
    for _ in range(30):
        fd, parent = os.open("d" * 200, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    with open(os.open("later.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
        f.write("z")
    os.close(fd)
    assert watcher.barrier()
    assert deepest.replace(b"deepest", b"later") in collector.touched()
    assert watcher.is_alive()


@pytest.mark.parametrize("root", ["missing", "symlink", "file"])
def test_a_bad_root_is_one_clear_error(tmp_path: Path, root: str) -> None:
    target = tmp_path / "root"
    if root == "symlink":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    elif root == "file":
        target.write_text("x")
    watcher = Watcher([target], IgnoreRules([]), tmp_path / "b", on_hints=Collector())
    message = {"missing": "No such file", "symlink": "symlink", "file": "not a directory"}[root]
    with pytest.raises(OSError, match=message) as info:
        watcher.start()
    assert info.value.filename == str(target)
    watcher.stop()  # cleans up only what started


def test_state_dir_is_never_watched(ws: Path, tmp_path: Path) -> None:
    state = ws / ".codi2"
    collector = Collector()
    watcher = Watcher([ws], IgnoreRules(IGNORES, [ws], [state]), state / "barrier", on_hints=collector)
    watcher.start()
    try:
        (state / "journal.db").write_text("x")
        (ws / "real.txt").write_text("y")
        assert watcher.barrier()
        assert {h.path for h in collector.take() if not isinstance(h, Move)} == {b"real.txt"}
    finally:
        watcher.stop()


def test_overflow_recrawls_and_watches_what_appeared(ws: Path, tmp_path: Path) -> None:
    collector = Collector()
    # A small backlog: when it is full the reader stops reading, so the kernel's own queue overflows.
    watcher = Watcher([ws], IgnoreRules(IGNORES), tmp_path / "b", on_hints=collector, max_backlog=100)
    watcher.start()
    max_queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    with lagging(watcher):
        (ws / "burst").mkdir()
        # Two events a file (create, close): the kernel queue and the first read the reader took can both
        # be full, and still events are left over.
        for i in range(max_queued + 100):
            (ws / f"f{i}").touch()
        (ws / "burst" / "later").mkdir()
    assert watcher.barrier(60)
    assert watcher.state.overflows >= 1
    assert Rescan(0, b"", True) in collector.take()
    assert_watches_match_disk(watcher, ws)
    watcher.stop()
