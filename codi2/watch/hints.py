"""What the watcher tells the pipeline: which paths may have changed, in kernel order. A neutral model,
so the watcher knows nothing of the journal and the reconciler nothing of inotify."""

from __future__ import annotations

from typing import NamedTuple

from codi2.trail.events import Origin


class Touch(NamedTuple):
    """This path may have changed: look at it. `created` says the kernel reported it appearing, so a
    file that is gone again by the time anyone looks is still recorded as having existed."""

    root: int
    path: bytes
    created: bool = False
    is_dir: bool = False


class Move(NamedTuple):
    """The kernel renamed `src` to `dst` within one root. `ino` is the directory's inode when the watcher
    knew the directory, so the pipeline can tell the entry it indexed from a newer one at the same name."""

    root: int
    src: bytes
    dst: bytes
    is_dir: bool
    ino: int | None


class Rescan(NamedTuple):
    """Diff `path` against the index: its direct children (and whatever is new below them), or with
    `recursive` the whole tree below it."""

    root: int
    path: bytes
    recursive: bool
    origin: Origin = "rescan"


class RootReplaced(NamedTuple):
    """The directory at root `root`'s path is not the one read so far, or there is none (removed, renamed
    away, replaced, a mount over it): read the root from its path again, as nothing while it is gone, and
    diff all of it against the index."""

    root: int


Hint = Touch | Move | Rescan | RootReplaced
