"""Watch roots at their paths: is the directory at a root's path still the one the tree holds?

The tree holds every root by a descriptor, and an inode with a descriptor open is not evicted: the kernel
says IN_DELETE_SELF for a root removed while codi2 runs only when that descriptor closes, that is never.
A root renamed away says IN_MOVE_SELF, and its watches go on reporting the renamed directory. So a root's
identity is checked at its path (a directory, not a symlink, with the (dev, inode) the tree holds) on
cheap triggers, and the watcher acts on the answer:

- a watch on each root's parent with only the name events (created, deleted, moved from or to) and its
  own removal or rename, filtered to the root's name: a root removed, made again, renamed away or
  replaced is checked at once. Watching the parent costs one watch per parent and an event per entry
  created or removed beside the root, which is `/` or a volume's mount point in a pod: a quiet directory;
- IN_MOVE_SELF, IN_DELETE_SELF, IN_UNMOUNT and IN_IGNORED on the root's own watch;
- a change of the mount table (a mount over the root, or over a directory above it);
- every check interval (`rescan_interval_s`), for what no event names: a directory further up renamed
  or replaced, a parent that could not be watched.

Roots never overlap (the config refuses it), so a parent is never a directory the tree watches, and two
roots with one parent share its watch.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import structlog

from codi2.watch.inotify import IN
from codi2.watch.tree import Ident

log = structlog.get_logger("codi2.watch.roots")

PARENT_MASK = (
    IN.IN_CREATE
    | IN.IN_DELETE
    | IN.IN_MOVED_FROM
    | IN.IN_MOVED_TO
    | IN.IN_DELETE_SELF
    | IN.IN_MOVE_SELF
    | IN.IN_ONLYDIR
)


def ident_at(path: bytes) -> Ident | None:
    """(dev, inode) of the directory at `path` now; None when there is none (a symlink is none)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class Parents:
    """The watches on the roots' parents. Handler thread only."""

    def __init__(self, roots: list[bytes], watch: Callable[[bytes, int], int], unwatch: Callable[[int], None]) -> None:
        self._parents = [os.path.dirname(r) for r in roots]
        self._names = [os.path.basename(r) for r in roots]
        self._watch = watch
        self._unwatch = unwatch
        self._wd: list[int | None] = [None] * len(roots)
        self._ident: list[Ident | None] = [None] * len(roots)
        self._roots_of: dict[int, set[int]] = {}

    def arm(self, index: int) -> None:
        """Watch root `index`'s parent, unless the directory at the parent's path is already watched."""
        if not self._names[index]:
            return  # the root is `/`: it has no parent and cannot go
        ident = ident_at(self._parents[index])
        if ident is not None and ident == self._ident[index] and self._wd[index] is not None:
            return
        self._release(index)
        if ident is None:
            return
        wd = self._watch(self._parents[index], PARENT_MASK)
        if wd < 0:
            log.warning(
                "watch_root_parent_unwatched",
                path=os.fsdecode(self._parents[index]),
                error=os.strerror(-wd),
                note="the root is checked every rescan_interval_s instead",
            )
            return
        self._wd[index], self._ident[index] = wd, ident
        self._roots_of.setdefault(wd, set()).add(index)

    def _release(self, index: int) -> None:
        wd = self._wd[index]
        self._wd[index] = self._ident[index] = None
        if wd is None:
            return
        sharing = self._roots_of.get(wd, set())
        sharing.discard(index)
        if not sharing:
            self._roots_of.pop(wd, None)
            self._unwatch(wd)

    def concerned(self, wd: int, mask: int, name: bytes) -> list[int] | None:
        """The roots an event on watch `wd` may have changed; None when `wd` is no parent's watch."""
        roots = self._roots_of.get(wd)
        if roots is None:
            return None
        if mask & IN.IN_IGNORED:  # the parent is gone: its watch with it
            self._roots_of.pop(wd, None)
            for index in roots:
                self._wd[index] = self._ident[index] = None
            return sorted(roots)
        if not name:  # the parent itself removed or renamed: the path below it changed
            return sorted(roots)
        return sorted(i for i in roots if self._names[i] == name)
