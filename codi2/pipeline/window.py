"""The batch window: the watcher's hints of one flush, in order, coalesced per path.

Pure bookkeeping, no I/O: the journal thread adds hints as they come and takes them all at the end of
the window. A rename carries the hints already queued under its source to the destination (so facts are
read where the entries are at the end of the window); hints for what the rename replaced are dropped.
"""

from __future__ import annotations

from codi2.trail.events import Origin
from codi2.watch.hints import Hint, Move, Rescan, RootReplaced, Touch

# The name a rescan keeps when two are merged: the start-up scan's over a recrawl's over a live one's.
_ORIGIN_RANK: list[Origin] = ["baseline", "offline", "rescan", "live"]

_Key = tuple[int, bytes] | tuple[str, int, bytes] | tuple[str, int]


class Window:
    """Hints of one batch window, in order, coalesced per path."""

    def __init__(self) -> None:
        self._items: dict[_Key, Hint] = {}
        self._moves = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, hint: Hint) -> None:
        if isinstance(hint, Touch):
            self._touch(hint)
        elif isinstance(hint, Rescan):
            self._rescan(hint)
        elif isinstance(hint, RootReplaced):
            self._items.setdefault(("root", hint.root), hint)  # once per window: the root is read again whole
        else:
            self._move(hint)

    def _touch(self, hint: Touch) -> None:
        key = (hint.root, hint.path)
        found = self._items.setdefault(key, hint)
        assert isinstance(found, Touch)
        # A hint that says the entry appeared replaces one that does not (keeping its place), and so does
        # a later appearance of another type: a directory removed, a file made and removed, a directory
        # made again at one name (ext4 hands it the old inode) is a new directory to walk, not a file.
        if hint.created and (not found.created or found.is_dir != hint.is_dir):
            self._items[key] = hint

    def _rescan(self, hint: Rescan) -> None:
        key = ("rescan", hint.root, hint.path)
        found = self._items.get(key)
        if found is None:
            self._items[key] = hint
            return
        # One look covers both: the deeper one, under the start-up scan's name if either is.
        assert isinstance(found, Rescan)
        origin = min(found.origin, hint.origin, key=_ORIGIN_RANK.index)
        self._items[key] = Rescan(hint.root, hint.path, found.recursive or hint.recursive, origin)

    def _move(self, hint: Move) -> None:
        root, src, dst = hint.root, hint.src, hint.dst
        carried: list[Hint] = []
        # A hint at the source name itself that speaks of another type than what moved is about another
        # entry: the first half of a RENAME_EXCHANGE brought it to `src` from a name outside the trail (a
        # name ignored only as a directory, `logs/`), and the second half moved what was at `src` before.
        # That hint stays at `src` (a directory that appeared there is walked whole). Only a directory's
        # hints and a file's `created` say their type for sure.
        again: Touch | None = None
        if hint.is_dir:
            src_below, dst_below = src + b"/", dst + b"/"
            for key, item in list(self._items.items()):
                if isinstance(item, Move | RootReplaced) or item.root != root:
                    continue
                path = item.path
                if path == dst or path.startswith(dst_below):
                    del self._items[key]
                elif path == src or path.startswith(src_below):
                    del self._items[key]
                    carried.append(_retarget(item, dst + path[len(src) :]))
                    if path == src and isinstance(item, Touch) and item.created and not item.is_dir:
                        again = item  # a file appeared at `src`: not the directory that moved
        else:
            self._items.pop((root, dst), None)
            found = self._items.pop((root, src), None)
            if isinstance(found, Touch) and found.is_dir:
                again = found
            elif isinstance(found, Touch):
                carried.append(_retarget(found, dst))
        self._moves += 1
        self._items[("move", self._moves)] = hint
        for item in carried:
            self.add(item)
        if again is not None:
            self.add(again)

    def take(self) -> list[Hint]:
        items = list(self._items.values())
        self._items.clear()
        return items

    def restore(self, hints: list[Hint]) -> None:
        """Put hints that could not be committed back in front of whatever arrived since."""
        later = self.take()
        for hint in [*hints, *later]:
            self.add(hint)


def _retarget(hint: Touch | Rescan, path: bytes) -> Touch | Rescan:
    return hint._replace(path=path)
