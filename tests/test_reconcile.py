"""The reconciler in-process: hints against a real temp tree and a real index (the journal's SQLite file,
or a dict behind the same `Index` protocol), events folded back must equal the disk.

The model test is in the style of Vector's disk_v2 `tests/model/`: hypothesis generates operations on a
real directory, the hints a watcher would hand over for them go through the batch window, and after every
window the trail so far folds to exactly what `trail_checks.disk_state` reads from the disk, with no
defect (nothing recorded twice, nothing inside a directory the trail lacks).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trail_checks import disk_state, trail_defects

from codi2.disk.fs import O_DIR, Facts, subtree_bounds
from codi2.disk.ignore import IgnoreRules
from codi2.journal.journal import Journal
from codi2.pipeline.factory import EventFactory
from codi2.pipeline.index import Index
from codi2.pipeline.reconcile import Reconciler
from codi2.pipeline.window import Window
from codi2.trail.events import Event, Identity
from codi2.trail.replay import fold
from codi2.watch.hints import Hint, Move, Rescan, Touch


class DictIndex:
    """The index as a dict: the `Index` protocol with nothing but Python behind it."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, bytes], Facts] = {}

    def get(self, root: str, key: bytes) -> Facts | None:
        return self.rows.get((root, key))

    def get_many(self, root: str, keys: list[bytes]) -> dict[bytes, Facts]:
        return {k: f for k in keys if (f := self.rows.get((root, k))) is not None}

    def _below(self, root: str, key: bytes) -> list[tuple[bytes, Facts]]:
        low, high = subtree_bounds(key)
        return sorted(((k, f) for (r, k), f in self.rows.items() if r == root and low <= k < high), key=_first)

    def below(self, root: str, key: bytes, start: bytes, limit: int) -> list[tuple[bytes, Facts]]:
        return [(k, f) for k, f in self._below(root, key) if k >= start][:limit]

    def below_reversed(self, root: str, key: bytes) -> list[tuple[bytes, str]]:
        return [(k, f.type) for k, f in reversed(self._below(root, key))]

    def put_many(self, rows: list[tuple[str, bytes, Facts]]) -> None:
        for root, key, facts in rows:
            self.rows[(root, key)] = facts

    def drop_tree(self, root: str, key: bytes) -> None:
        for k, _ in self._below(root, key):
            del self.rows[(root, k)]
        self.rows.pop((root, key), None)

    def move_tree(self, root: str, src: bytes, dst: bytes) -> None:
        self.drop_tree(root, dst)
        moved = [(src, f) for f in [self.rows.get((root, src))] if f is not None] + self._below(root, src)
        self.drop_tree(root, src)
        for k, f in moved:
            self.rows[(root, dst + k[len(src) :])] = f

    def linked(self, dev: int, ino: int) -> list[tuple[str, bytes]]:
        return [(r, k) for (r, k), f in self.rows.items() if (f.dev, f.ino) == (dev, ino)]


def _first(row: tuple[bytes, Facts]) -> bytes:
    return row[0]


class Harness:
    """A reconciler over one root, flushing windows the way the journal thread does."""

    def __init__(self, root: Path, index: Index, journal: Journal | None, *, silent_baseline: bool = False) -> None:
        self.root = root
        self.index = index
        self.journal = journal
        self.fd = os.open(root, O_DIR)
        self.events: list[Event] = []
        factory = EventFactory(Identity("t1", "u1", None, "pod"), [str(root)], itertools.count(1).__next__)
        self.rec = Reconciler(
            index, [self.fd], [str(root)], IgnoreRules([], [root]), 1 << 20, factory, silent_baseline=silent_baseline
        )

    def flush(self, *hints: Hint) -> list[Event]:
        """One window: coalesce the hints, reconcile them, commit; the window's events."""
        window = Window()
        for hint in hints:
            window.add(hint)
        txn = self.journal.transaction() if self.journal is not None else contextlib.nullcontext()
        try:
            with txn:
                for hint in window.take():
                    for _ in self.rec.apply(hint, hint.origin if isinstance(hint, Rescan) else "live"):
                        pass
                for _ in self.rec.close_vanished():
                    pass
                self.rec.write_index()
        finally:
            self.rec.end_flush()
        events = self.rec.take_events()
        self.events += events
        return events

    def converged(self) -> None:
        assert fold(self.events) == disk_state(self.root)
        defects = trail_defects(self.events)
        assert not defects, defects

    def close(self) -> None:
        os.close(self.fd)
        if self.journal is not None:
            self.journal.close()


Make = Callable[..., Harness]


@contextlib.contextmanager
def _harness(base: Path, kind: str, *, silent_baseline: bool = False) -> Iterator[Harness]:
    root = base / "ws"
    root.mkdir()
    journal = Journal(base / "journal.db", fsync=False) if kind == "journal" else None
    h = Harness(root, journal if journal is not None else DictIndex(), journal, silent_baseline=silent_baseline)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(params=["journal", "dict"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    with contextlib.ExitStack() as stack:

        def start(**kwargs: bool) -> Harness:
            return stack.enter_context(_harness(tmp_path, request.param, **kwargs))

        yield start


def _actions(events: list[Event]) -> list[tuple[str, str, str | None]]:
    return [(e.action, e.path, e.dest_path) for e in events]


def test_a_file_is_created_then_updated_once_however_often_it_was_written(make: Make) -> None:
    h = make()
    f = h.root / "f"
    f.write_text("1")
    assert _actions(h.flush(Touch(0, b"f", True))) == [("created", "f", None)]
    assert h.flush(Touch(0, b"f")) == []  # a hint at a path that did not change says nothing
    for text in ("22", "333", "4444"):
        f.write_text(text)
    (updated,) = h.flush(Touch(0, b"f"), Touch(0, b"f"), Touch(0, b"f"))
    assert (updated.action, updated.size) == ("updated", 4)
    h.converged()


def test_a_created_directory_is_walked_whole(make: Make) -> None:
    h = make()
    (h.root / "d" / "sub").mkdir(parents=True)
    (h.root / "d" / "sub" / "f").write_text("x")
    (h.root / "d" / "g").write_text("y")
    got = h.flush(Touch(0, b"d", True, True))
    assert _actions(got) == [("created", p, None) for p in ("d", "d/g", "d/sub", "d/sub/f")]
    h.converged()


def test_a_removed_tree_is_deleted_deepest_first(make: Make) -> None:
    h = make()
    (h.root / "d" / "sub").mkdir(parents=True)
    (h.root / "d" / "sub" / "f").write_text("x")
    h.flush(Rescan(0, b"", True, "baseline"))
    shutil.rmtree(h.root / "d")
    got = h.flush(Touch(0, b"d/sub/f"), Touch(0, b"d/sub", False, True), Touch(0, b"d", False, True))
    assert _actions(got) == [("deleted", "d/sub/f", None), ("deleted", "d/sub", None), ("deleted", "d", None)]
    h.converged()


def test_a_renamed_directory_is_one_moved_event_and_changes_inside_follow_it(make: Make) -> None:
    h = make()
    (h.root / "a").mkdir()
    (h.root / "a" / "f").write_text("x")
    h.flush(Rescan(0, b"", True, "baseline"))
    (h.root / "a" / "f").write_text("changed before the rename")
    (h.root / "a").rename(h.root / "b")
    got = h.flush(Touch(0, b"a/f"), Move(0, b"a", b"b", True, None))
    assert _actions(got) == [("moved", "a", "b"), ("updated", "b/f", None)]
    h.converged()


def test_an_entry_that_appeared_and_vanished_is_created_and_deleted_without_facts(make: Make) -> None:
    h = make()
    got = h.flush(Touch(0, b"gone", True))
    assert _actions(got) == [("created", "gone", None), ("deleted", "gone", None)]
    assert all(e.size is None and e.sha256 is None for e in got)
    h.converged()


def test_a_silent_baseline_fills_the_index_without_events(make: Make) -> None:
    h = make(silent_baseline=True)
    (h.root / "f").write_text("1")
    assert h.flush(Rescan(0, b"", True, "baseline")) == []
    (h.root / "f").write_text("22")
    assert _actions(h.flush(Touch(0, b"f"), Rescan(0, b"", True, "rescan"))) == [("updated", "f", None)]


# dir -> file -> dir at one name within one window (issue #22, defect 2) ------------------------------


def test_a_directory_the_kernel_says_was_created_is_walked_though_the_index_knows_its_inode(make: Make) -> None:
    """ext4 hands a directory made again at a name the old one's inode, and the window may keep the hint
    of the file made there in between: what the kernel says appeared is walked, whatever its identity.
    Here the very same directory stands in for the new one; d/f was written before any watch on it."""
    h = make()
    (h.root / "d").mkdir()
    h.flush(Rescan(0, b"", True, "baseline"))
    (h.root / "d" / "f").write_text("written before the watch")
    assert _actions(h.flush(Touch(0, b"d", True, False))) == [("created", "d/f", None)]
    h.converged()


# The model ------------------------------------------------------------------------------------------

NAMES = [b"a", b"b", b"a/a", b"a/b", b"b/a", b"a/a/b"]
Op = tuple[str, bytes, bytes]
OPS = st.tuples(
    st.sampled_from(["write", "write", "mkdir", "symlink", "remove", "rename", "recreate"]),
    st.sampled_from(NAMES),
    st.sampled_from(NAMES),
)


def _path(root: Path, rel: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(root), rel)))


def _real_dir(root: Path, rel: bytes) -> bool:
    """Whether `rel` is a directory reached through directories only (no symlink on the way)."""
    parts = rel.split(b"/")
    for n in range(1, len(parts) + 1):
        at = _path(root, b"/".join(parts[:n]))
        if at.is_symlink() or not at.is_dir():
            return False
    return True


def _apply(root: Path, op: Op) -> list[Hint]:
    """Do `op` on the disk if it can be done there; the hints a watcher keeping up hands over for it."""
    kind, p, q = op
    parent = os.path.dirname(p)
    if parent and not _real_dir(root, parent):
        return []
    at = _path(root, p)
    exists = os.path.lexists(at)
    is_dir = exists and _real_dir(root, p)
    if kind == "write" and not is_dir and not at.is_symlink():
        at.write_bytes(q * (1 + len(p)))
        return [Touch(0, p, not exists)]
    if kind in ("mkdir", "symlink") and not exists:
        if kind == "mkdir":
            at.mkdir()
        else:
            at.symlink_to(os.fsdecode(q))
        return [Touch(0, p, True, kind == "mkdir")]
    if kind == "remove" and exists:
        return _remove(root, p)
    to_parent = os.path.dirname(q)
    if kind == "rename" and exists and p != q and (not to_parent or _real_dir(root, to_parent)):
        try:
            at.rename(_path(root, q))
        except OSError:
            return []  # into itself, onto a non-empty directory, a directory onto a file
        return [Move(0, p, q, is_dir, None)]
    if kind == "recreate" and is_dir:  # rm -r p; touch p; rm p; mkdir p; echo > p/a (before its watch)
        hints = _remove(root, p)
        at.write_bytes(b"a file for a moment")
        at.unlink()
        at.mkdir()
        (at / "a").write_bytes(q)
        return [*hints, Touch(0, p, True, False), Touch(0, p), Touch(0, p, True, True)]
    return []


def _remove(root: Path, p: bytes) -> list[Hint]:
    """rm -r: the hints of every entry removed, deepest first."""
    at = _path(root, p)
    hints: list[Hint] = []
    if _real_dir(root, p):
        for name in sorted(os.listdir(os.fsencode(at))):
            hints += _remove(root, p + b"/" + name)
        at.rmdir()
        return [*hints, Touch(0, p, False, True)]
    at.unlink()
    return [Touch(0, p)]


@pytest.mark.parametrize("kind", ["journal", "dict"])
@settings(max_examples=100)
@given(windows=st.lists(st.lists(OPS, min_size=1, max_size=6), min_size=1, max_size=5))
def test_model_the_trail_folds_to_the_disk_after_every_window(kind: str, windows: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as base, _harness(Path(base), kind) as h:
        h.flush(Rescan(0, b"", True, "baseline"))
        for ops in windows:
            h.flush(*(hint for op in ops for hint in _apply(h.root, op)))
            h.converged()
