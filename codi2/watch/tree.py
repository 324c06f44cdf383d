"""The tree of watched directories: what the watcher believes the directories under each root are.

Identity, not paths. The kernel names a directory by its watch descriptor and its inode; a path is only
where that directory sat when an event was queued. So every watched directory is a `Node` (wd, parent,
name, inode), a path is derived from the tree, and a rename is one update of one node. As Watchman keeps
its view (InMemoryView) apart from the watcher that feeds it, the tree knows nothing of events: the
watcher decides what changes, the tree keeps the indexes (by watch descriptor, by inode) consistent and
answers where a node is, and whether the disk still holds that very directory there.

Only the watcher's handler thread touches a tree.
"""

from __future__ import annotations

import errno
import os
import stat

from codi2.disk.fs import O_DIR, RESOURCE_ERRNOS, open_dir

Ident = tuple[int, int]  # (st_dev, st_ino): a directory, wherever it is


class Starved(Exception):
    """Out of file descriptors (or memory): a directory that cannot be opened now is not gone, so nothing
    may be concluded from it. Handling stops at that step, and every tree is recrawled once descriptors
    are back (as after a queue overflow)."""


class Node:
    """A watched directory (or, with `wd` None, a directory that could not be watched: `reason` says why)."""

    __slots__ = ("_gen", "_where", "children", "dev", "ino", "is_root", "name", "parent", "reason", "root", "wd")

    def __init__(self, root: int, parent: Node | None, name: bytes, wd: int | None, dev: int, ino: int) -> None:
        self.root = root
        self.parent = parent
        self.name = name
        self.wd = wd
        self.dev = dev
        self.ino = ino
        self.is_root = parent is None
        self.children: dict[bytes, Node] = {}
        self.reason: str | None = None
        self._gen = -1
        self._where: bytes | None = None

    @property
    def ident(self) -> Ident:
        return self.dev, self.ino

    def locate(self, gen: int) -> bytes | None:
        """The path relative to the root (b"" for the root), or None when the node is out of the tree.
        Cached until the tree changes shape (`gen`): file events, the hot path, only read the cache."""
        if self._gen != gen:
            parts: list[bytes] = []
            node = self
            where: bytes | None = None
            while True:
                if node.is_root:
                    where = b"/".join(reversed(parts))
                    break
                parent = node.parent
                if parent is None or parent.children.get(node.name) is not node:
                    break
                parts.append(node.name)
                node = parent
            self._gen, self._where = gen, where
        return self._where

    def walk(self) -> list[Node]:
        """This node and every node below it."""
        out, stack = [], [self]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


class Tree:
    """Nodes under each root, indexed by watch descriptor and by inode, with the unwatched ones apart.
    A node may be out of the tree (`where` is None) and still indexed: the watcher decides when to
    `forget` it."""

    def __init__(self, roots: list[bytes]) -> None:
        self.roots = roots
        self.root_nodes: list[Node | None] = [None] * len(roots)  # None while a root is gone
        self._root_fds: list[int | None] = [None] * len(roots)
        self._gen = 0  # bumped whenever the tree changes shape
        self._by_wd: dict[int, Node] = {}
        self._by_ident: dict[Ident, Node] = {}
        self._unwatched: set[Node] = set()
        self._unwatched_changed = False

    # Roots and indexes --------------------------------------------------------------------------------

    def open_root(self, index: int) -> int:
        """A descriptor of the directory at root `index`'s path now, kept (and closed by `remove_root` or
        `close`) to reach every node from."""
        fd = os.open(self.roots[index], O_DIR)
        self._close_root(index)
        self._root_fds[index] = fd
        return fd

    def add_root(self, index: int, wd: int, st: os.stat_result) -> Node:
        node = Node(index, None, b"", wd, st.st_dev, st.st_ino)
        self.register(node)
        self.root_nodes[index] = node
        return node

    def remove_root(self, index: int) -> tuple[list[Node], list[int]]:
        """Root `index`'s directory has left its path: forget it and everything below it (as `forget`:
        the caller removes the watches) and let go of its descriptor. Its node stops being a root, so
        nothing that was below it has a path any more."""
        node = self.root_nodes[index]
        self.root_nodes[index] = None
        self._close_root(index)
        if node is None:
            return [], []
        node.is_root = False
        self._changed()
        return self.forget(node)

    def _close_root(self, index: int) -> None:
        fd = self._root_fds[index]
        self._root_fds[index] = None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for index in range(len(self.roots)):
            self._close_root(index)

    def register(self, node: Node) -> None:
        if node.wd is not None:
            self._by_wd[node.wd] = node
        self._by_ident[node.ident] = node

    def by_wd(self, wd: int) -> Node | None:
        return self._by_wd.get(wd)

    def by_ident(self, ident: Ident) -> Node | None:
        return self._by_ident.get(ident)

    def watch_lost(self, node: Node) -> None:
        """The kernel dropped `node`'s watch (IN_IGNORED): its descriptor names nothing any more."""
        if node.wd is not None:
            self._by_wd.pop(node.wd, None)

    @property
    def watches(self) -> int:
        return len(self._by_wd)

    def watched_paths(self) -> dict[bytes, Node]:
        """Every watched directory in the tree, by path (what the watches cover, for checks)."""
        out = {}
        for node in self._by_wd.values():
            where = node.locate(self._gen)
            if where is not None:
                out[where] = node
        return out

    # Shape --------------------------------------------------------------------------------------------

    def where(self, node: Node) -> bytes | None:
        """`node`'s path relative to its root (b"" for a root), None when it is out of the tree."""
        return node.locate(self._gen)

    def place(self, parent: Node, name: bytes, node: Node) -> Node | None:
        """Put `node` at parent/name, taking it from wherever it was. Returns the node that was there,
        now out of the tree (its `parent` still says where it was): displacing it is the caller's call."""
        self.detach(node)
        old = parent.children.get(name)
        if old is node:
            old = None
        node.parent = parent
        node.name = name
        parent.children[name] = node
        self._changed()
        return old

    def detach(self, node: Node) -> None:
        """Take `node` out of its parent's children (if it is still there); it keeps its `parent`."""
        parent = node.parent
        if parent is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]
            self._changed()

    def orphan(self, node: Node) -> None:
        """Take `node` out of the tree for good: it no longer remembers where it was."""
        self.detach(node)
        node.parent = None

    def forget(self, node: Node) -> tuple[list[Node], list[int]]:
        """Take `node` out of the tree and out of every index, with everything below it. Returns those
        nodes, and the watch descriptors still held for them (the caller removes the watches)."""
        self.orphan(node)
        nodes = node.walk()
        released = []
        for n in nodes:
            if self._by_ident.get(n.ident) is n:
                del self._by_ident[n.ident]
            if n.wd is not None:
                if self._by_wd.pop(n.wd, None) is not None:
                    released.append(n.wd)
            elif n in self._unwatched:
                self._unwatched.discard(n)
                self._unwatched_changed = True
        return nodes, released

    def _changed(self) -> None:
        self._gen += 1
        self._unwatched_changed = True  # an unwatched directory's path may have changed with it

    # Unwatched directories ----------------------------------------------------------------------------

    def mark_unwatched(self, node: Node) -> None:
        self._unwatched.add(node)

    def unmark_unwatched(self, node: Node) -> None:
        self._unwatched.discard(node)

    def unwatched(self) -> list[Node]:
        return list(self._unwatched)

    def unwatched_report(self) -> dict[str, str] | None:
        """Every unwatched directory in the tree (its full path: why), or None when unchanged since the
        last report."""
        if not self._unwatched_changed:
            return None
        self._unwatched_changed = False
        report = {}
        for n in self._unwatched:
            where = n.locate(self._gen)
            if where is not None:
                report[os.fsdecode(os.path.join(self.roots[n.root], where))] = n.reason or "unknown"
        return report

    # The disk -----------------------------------------------------------------------------------------

    def dir_fd(self, node: Node) -> int:
        """A new descriptor of `node`'s directory at its tree path; raises OSError if that is not `node`,
        and Starved when out of descriptors."""
        where = node.locate(self._gen)
        if where is None:
            raise FileNotFoundError(errno.ENOENT, "not in the tree")
        root_fd = self._root_fds[node.root]
        if root_fd is None:
            raise FileNotFoundError(errno.ENOENT, "its root is gone")
        try:
            fd = open_dir(root_fd, where)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise Starved(exc.strerror) from exc
            raise
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != node.ident:
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "another directory is at this path now")
        return fd

    def ident_at(self, parent: Node, name: bytes) -> Ident | None:
        """(dev, inode) of the directory at parent/name now; None if there is none we can see."""
        try:
            fd = self.dir_fd(parent)
        except OSError:
            return None
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(fd)
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
