"""The tree of watched directories, in process: paths from identity, displacement, forgetting, the indexes.

No inotify here: watch descriptors are plain numbers. The disk is only read where the tree reads it
(`dir_fd`, `ident_at`), on a real temp dir.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from codi2.watch.tree import Node, Tree


def stat_of(ino: int) -> os.stat_result:
    return os.stat_result((0o40755, ino, 1, 1, 0, 0, 0, 0, 0, 0))


def child(tree: Tree, parent: Node, name: bytes, wd: int | None, ino: int) -> Node:
    node = Node(parent.root, parent, name, wd, 1, ino)
    tree.register(node)
    assert tree.place(parent, name, node) is None
    return node


@pytest.fixture
def tree() -> Tree:
    t = Tree([b"/ws"])
    t.add_root(0, 1, stat_of(100))
    return t


def test_paths_come_from_the_tree_and_a_rename_moves_a_whole_subtree(tree: Tree) -> None:
    root = tree.root_nodes[0]
    src = child(tree, root, b"src", 2, 101)
    deep = child(tree, src, b"deep", 3, 102)
    assert [tree.where(n) for n in (root, src, deep)] == [b"", b"src", b"src/deep"]
    lib = child(tree, root, b"lib", 4, 103)
    assert tree.place(lib, b"moved", src) is None  # one update of one node
    assert tree.where(deep) == b"lib/moved/deep"
    assert tree.where(src) == b"lib/moved"
    assert set(tree.watched_paths()) == {b"", b"lib", b"lib/moved", b"lib/moved/deep"}


def test_placing_over_a_name_hands_back_what_was_there(tree: Tree) -> None:
    root = tree.root_nodes[0]
    old = child(tree, root, b"build", 2, 101)
    inner = child(tree, old, b"obj", 3, 102)
    new = Node(0, root, b"build", 4, 1, 103)
    tree.register(new)
    assert tree.place(root, b"build", new) is old
    assert old.parent is root  # where it was, for the caller to suspect
    assert tree.where(old) is None and tree.where(inner) is None
    assert tree.where(new) == b"build"
    assert tree.by_wd(2) is old and tree.by_ident((1, 101)) is old  # still indexed until forgotten
    tree.orphan(old)
    assert old.parent is None


def test_forget_drops_a_subtree_from_every_index_and_releases_its_watches(tree: Tree) -> None:
    root = tree.root_nodes[0]
    pkg = child(tree, root, b"pkg", 2, 101)
    lost = child(tree, pkg, b"lost", 3, 102)
    unwatched = child(tree, pkg, b"locked", None, 103)
    tree.mark_unwatched(unwatched)
    tree.watch_lost(lost)  # IN_IGNORED: the kernel already dropped that watch
    nodes, released = tree.forget(pkg)
    assert set(nodes) == {pkg, lost, unwatched}
    assert released == [2]
    assert tree.by_wd(2) is None and tree.by_wd(3) is None
    assert tree.by_ident((1, 101)) is None and tree.by_ident((1, 103)) is None
    assert tree.unwatched() == [] and tree.watches == 1
    assert tree.where(pkg) is None and pkg.parent is None


def test_forget_leaves_the_index_to_a_node_that_took_the_inode_over(tree: Tree) -> None:
    root = tree.root_nodes[0]
    old = child(tree, root, b"a", 2, 101)
    newer = Node(0, root, b"b", 3, 1, 101)  # the same directory, watched again under another node
    tree.register(newer)
    tree.place(root, b"b", newer)
    tree.forget(old)
    assert tree.by_ident((1, 101)) is newer


def test_unwatched_report_follows_renames_and_is_none_when_unchanged(tree: Tree) -> None:
    root = tree.root_nodes[0]
    parent = child(tree, root, b"a", 2, 101)
    locked = child(tree, parent, b"locked", None, 102)
    locked.reason = "Permission denied"
    tree.mark_unwatched(locked)
    assert tree.unwatched_report() == {"/ws/a/locked": "Permission denied"}
    assert tree.unwatched_report() is None
    tree.place(root, b"b", parent)
    assert tree.unwatched_report() == {"/ws/b/locked": "Permission denied"}
    tree.detach(parent)
    assert tree.unwatched_report() == {}  # out of the tree: nothing to report at any path


@pytest.fixture
def disk_tree(tmp_path: Path) -> Iterator[tuple[Tree, Path]]:
    (tmp_path / "d" / "e").mkdir(parents=True)
    t = Tree([os.fsencode(tmp_path)])
    fd = t.open_root(0)
    t.add_root(0, 1, os.fstat(fd))
    yield t, tmp_path
    t.close()


def test_dir_fd_reaches_the_very_directory_a_node_is(disk_tree: tuple[Tree, Path]) -> None:
    tree, ws = disk_tree
    root = tree.root_nodes[0]
    st = os.stat(ws / "d")
    d = Node(0, root, b"d", 2, st.st_dev, st.st_ino)
    tree.register(d)
    tree.place(root, b"d", d)
    fd = tree.dir_fd(d)
    try:
        assert os.fstat(fd).st_ino == st.st_ino
    finally:
        os.close(fd)
    e = os.stat(ws / "d" / "e")
    assert tree.ident_at(d, b"e") == (e.st_dev, e.st_ino)
    assert tree.ident_at(d, b"missing") is None
    (ws / "d").rename(ws / "old-d")  # kept, so its inode cannot be reused by the next one
    (ws / "d").mkdir()  # another directory under the same name
    with pytest.raises(FileNotFoundError, match="another directory"):
        tree.dir_fd(d)
    assert tree.ident_at(d, b"anything") is None
    tree.detach(d)
    with pytest.raises(FileNotFoundError, match="not in the tree"):
        tree.dir_fd(d)
