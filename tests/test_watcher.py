"""The watcher on real inotify and real temp trees. `barrier()` makes every check exact, not timed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from codi2.watcher import Change, IgnoreRules, Watcher

IGNORES = [".git", "node_modules", "target", "dist"]


class Collector:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.lock = threading.Lock()

    def __call__(self, changes: list[Change]) -> None:
        with self.lock:
            self.changes.extend(changes)

    def take(self) -> list[tuple[str, bytes, bytes | None, bool]]:
        with self.lock:
            out = [(c.action, c.path, c.dest, c.is_dir) for c in self.changes]
            self.changes.clear()
        return out


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    return root


@pytest.fixture
def watch(ws: Path, tmp_path: Path) -> Iterator[tuple[Watcher, Collector]]:
    collector = Collector()
    watcher = Watcher([ws], IgnoreRules(IGNORES), tmp_path / "state" / "barrier", on_changes=collector)
    yield watcher, collector
    watcher.stop()


def _start(watch: tuple[Watcher, Collector]) -> tuple[Watcher, Collector]:
    watcher, collector = watch
    watcher.start()
    return watcher, collector


def test_ignored_trees_get_no_watches(ws: Path, watch: tuple[Watcher, Collector]) -> None:
    for i in range(20):
        (ws / "src" / f"d{i}").mkdir(parents=True)
        (ws / "node_modules" / f"pkg{i}" / "lib").mkdir(parents=True)
        (ws / "src" / f"d{i}" / "node_modules" / "x").mkdir(parents=True)
    (ws / ".git" / "objects").mkdir(parents=True)
    watcher, _ = _start(watch)
    assert watcher.state.watches == 1 + 1 + 20  # root, src, src/d*


def test_file_lifecycle_in_kernel_order(ws: Path, watch: tuple[Watcher, Collector]) -> None:
    watcher, collector = _start(watch)
    (ws / "a.txt").write_text("one")
    (ws / "a.txt").rename(ws / "b.txt")
    (ws / "b.txt").unlink()
    assert watcher.barrier()
    seen = collector.take()
    assert seen[0] == ("created", b"a.txt", None, False)
    assert ("moved", b"a.txt", b"b.txt", False) in seen
    assert seen[-1] == ("deleted", b"b.txt", None, False)
    assert {a for a, *_ in seen} == {"created", "updated", "moved", "deleted"}


def test_new_directory_contents_are_reported_and_watched(ws: Path, watch: tuple[Watcher, Collector]) -> None:
    watcher, collector = _start(watch)
    # A separate process fills new directories as fast as it can: files may land before the watch.
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
    created = {path for action, path, _, _ in collector.take() if action == "created"}
    expected = {f"n/{d}/deep/f{f}".encode() for d in range(10) for f in range(30)}
    assert expected <= created
    assert watcher.state.watches == 1 + 1 + 10 + 10
    (ws / "n" / "3" / "deep" / "late.txt").write_text("x")
    assert watcher.barrier()
    assert ("created", b"n/3/deep/late.txt", None, False) in collector.take()


def test_directory_rename_keeps_paths_right(ws: Path, watch: tuple[Watcher, Collector]) -> None:
    (ws / "old" / "sub").mkdir(parents=True)
    watcher, collector = _start(watch)
    (ws / "old").rename(ws / "new")
    (ws / "new" / "sub" / "f.txt").write_text("x")
    assert watcher.barrier()
    seen = collector.take()
    assert seen[0] == ("moved", b"old", b"new", True)
    assert ("created", b"new/sub/f.txt", None, False) in seen


def test_directory_moved_out_loses_its_watches(ws: Path, tmp_path: Path, watch: tuple[Watcher, Collector]) -> None:
    (ws / "pkg" / "deep").mkdir(parents=True)
    outside = tmp_path / "outside"
    watcher, collector = _start(watch)
    assert watcher.state.watches == 3
    (ws / "pkg").rename(outside)
    assert watcher.barrier()
    assert collector.take() == [("deleted", b"pkg", None, True)]
    assert watcher.state.watches == 1
    (outside / "deep" / "after.txt").write_text("not ours any more")
    assert watcher.barrier()
    assert collector.take() == []


def test_directory_moved_in_is_reported_and_watched(ws: Path, tmp_path: Path, watch: tuple[Watcher, Collector]) -> None:
    outside = tmp_path / "incoming"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner" / "f.txt").write_text("x")
    watcher, collector = _start(watch)
    outside.rename(ws / "incoming")
    assert watcher.barrier()
    seen = collector.take()
    assert seen[0] == ("created", b"incoming", None, True)
    assert ("created", b"incoming/inner/f.txt", None, False) in seen
    (ws / "incoming" / "inner" / "g.txt").write_text("y")
    assert watcher.barrier()
    assert ("created", b"incoming/inner/g.txt", None, False) in collector.take()


def test_rename_into_ignored_name_counts_as_moved_out(ws: Path, watch: tuple[Watcher, Collector]) -> None:
    (ws / "build").mkdir()
    watcher, collector = _start(watch)
    (ws / "build").rename(ws / "dist")
    assert watcher.barrier()
    assert collector.take() == [("deleted", b"build", None, True)]
    assert watcher.state.watches == 1


def test_hostile_names_are_reported(ws: Path, watch: tuple[Watcher, Collector]) -> None:
    watcher, collector = _start(watch)
    raw = os.fsencode(ws) + b"/caf\xe9-\xff.txt"
    with open(raw, "wb") as f:
        f.write(b"x")
    (ws / "new\nline.txt").write_text("y")
    fd = os.open(ws, os.O_RDONLY)
    for _ in range(30):  # 30 x 200 bytes: deeper than PATH_MAX allows a watch for
        os.mkdir("d" * 200, dir_fd=fd)
        fd, parent = os.open("d" * 200, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(fd)
    loop = ws / "loop"
    loop.symlink_to(ws, target_is_directory=True)
    assert watcher.barrier()
    seen = collector.take()
    assert ("created", b"caf\xe9-\xff.txt", None, False) in seen
    assert ("created", b"new\nline.txt", None, False) in seen
    assert ("created", b"loop", None, False) in seen  # a symlink is an entry, never followed
    assert any(reason for reason in watcher.state.unwatched.values())
    assert watcher.is_alive()


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    watcher = Watcher([tmp_path / "nope"], IgnoreRules([]), tmp_path / "b", on_changes=Collector())
    with pytest.raises(OSError, match="watch path is not a directory"):
        watcher.start()


def test_state_dir_is_never_watched(ws: Path, tmp_path: Path) -> None:
    state = ws / ".codi2"
    collector = Collector()
    watcher = Watcher([ws], IgnoreRules(IGNORES, [state]), state / "barrier", on_changes=collector)
    watcher.start()
    try:
        (state / "audit.db").write_text("x")
        (ws / "real.txt").write_text("y")
        assert watcher.barrier()
        assert [p for _, p, _, _ in collector.take()] == [b"real.txt", b"real.txt", b"real.txt"]
    finally:
        watcher.stop()
