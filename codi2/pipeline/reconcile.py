"""Hints become events by comparing the index (what the trail says) with the disk (what is there now).

Every event is an observation: at its time, the path held what the event says. The index is the fold of
the trail, so comparing it with the disk yields exactly what the trail lacks, nothing twice: a hint at a
path that did not change produces nothing, and the same change hinted by inotify, a walk and a rescan is
recorded once. Facts are read where the entry is at the time of the flush; a hint queued under a
directory that the window later renamed has already been rewritten to the new place (`Window`), and a
hint that arrived too late to find its entry is covered by the rescan every directory rename brings.

Everything here runs in the pipeline's worker thread inside a journal transaction; the generators yield
after every event so the caller can commit a full batch and carry on (a walk of a huge tree streams in
bounded batches instead of holding the tree in memory).
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterator
from typing import cast

from codi2.disk.fs import (
    ABSENT_ERRNOS,
    RESOURCE_ERRNOS,
    DirCache,
    EntryType,
    Facts,
    HashProgress,
    Unreadable,
    key_of,
    lstat_at,
    read_facts,
    rel_of,
    split,
    subtree_bounds,
)
from codi2.disk.ignore import IgnoreRules
from codi2.disk.walk import DiskEntry, entries, excluded
from codi2.pipeline.factory import EventFactory
from codi2.pipeline.index import Index
from codi2.trail.events import Action, Event, Origin, rfc3339
from codi2.watch.hints import Hint, Move, Rescan, Touch

CHUNK = 512
# Inodes with names the watcher cannot see, re-statted per round (`recheck`): a round costs an index
# lookup per inode and a stat per name, a hash only for what moved.
RECHECK_BUDGET = 1000


class _Unknown:
    """The disk could not be read here (permission): leave the index as it is."""


UNKNOWN = _Unknown()
DiskState = Facts | None | _Unknown


def content_changed(known: Facts, disk: Facts) -> bool:
    """What an `updated` event reports: size, mode, owner, mtime, hash or a symlink's target (not the inode
    or ctime alone); for a directory only its mode and owner (its size and mtime move with every entry). A
    fact the index does not know (an index rebuilt from the trail, 0.1's index, a row from before the
    owner was kept) is not a change."""
    if owner_changed(known, disk):
        return True
    if disk.type == "dir":
        return known.mode is not None and known.mode != disk.mode
    return (
        (known.size is not None and known.size != disk.size)
        or (known.mode is not None and known.mode != disk.mode)
        or (known.mtime_ns is not None and known.mtime_ns != disk.mtime_ns)
        or (disk.type == "file" and known.sha256 is not None and known.sha256 != disk.sha256)
        or (disk.type == "symlink" and known.target is not None and known.target != disk.target)
    )


def owner_changed(known: Facts, disk: Facts) -> bool:
    """`chown`: the event's uid and gid are the new owner; the old one is the path's previous state."""
    return (known.uid is not None and known.uid != disk.uid) or (known.gid is not None and known.gid != disk.gid)


def _restat(known: Facts, disk: Facts) -> bool:
    """Same content, new stat (or facts the index lacks): remembered, so it is not hashed again and a
    later change of what was unknown is seen."""
    return (known.ino, known.ctime_ns, known.nlink, known.dev, known.uid, known.gid, known.target) != (
        disk.ino,
        disk.ctime_ns,
        disk.nlink,
        disk.dev,
        disk.uid,
        disk.gid,
        disk.target,
    )


def same_entity(known: Facts, disk: Facts) -> bool:
    """The same directory (or file) by identity; an index rebuilt from the trail knows no inodes."""
    if known.type != disk.type:
        return False
    return known.ino is None or (known.ino == disk.ino and known.dev in (None, disk.dev))


class Reconciler:
    """Settles the window's hints one by one against the index, collecting the events of the batch being
    built; the caller takes them when it commits (`take_events`) and ends every flush with `end_flush`."""

    def __init__(
        self,
        index: Index,
        root_fds: list[int],
        root_names: list[str],
        rules: IgnoreRules,
        hash_max: int,
        events: EventFactory,
        *,
        silent_baseline: bool = False,
    ) -> None:
        self._j = index
        self._names = root_names
        self._rules = rules
        self._hash_max = hash_max
        self._factory = events
        # `initial_scan = "silent"`: the first start's walk records the state without events.
        self._silent_baseline = silent_baseline
        self._silent = False
        self._events: list[Event] = []
        self._event_bytes = 0  # a rough size of `_events`, for the batch byte budget
        self._cache = DirCache(root_fds)
        self._known: dict[tuple[str, bytes], Facts | None] = {}  # index rows read ahead for a flush
        self._puts: dict[tuple[str, bytes], Facts] = {}  # index rows to write, in one statement
        self._walked: set[tuple[int, bytes]] = set()  # directories walked whole in this flush
        self._links_touched = 0  # bumped when other names of a file are settled: a walk's index rows age
        self._vanished: list[tuple[int, bytes, Origin]] = []  # directories created and gone, `deleted` owed
        self.entries_walked = 0  # entries the walks listed, ever: the start-up diff's progress (read by any thread)
        # (dev, ino) of files seen with more links than the index may hold names for: a write through a
        # name in an ignored tree or outside every root has no inotify event, so they are looked at again
        # (`recheck`). Ordered: each round takes the oldest and puts back those still short of names.
        self._recheck: dict[tuple[int, int], None] = {}
        self.hashing = HashProgress()  # the hash being computed now, for /status

    # The batch being built ---------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events recorded since the last `take_events`."""
        return len(self._events)

    @property
    def event_bytes(self) -> int:
        return self._event_bytes

    def add_event(self, event: Event) -> None:
        """An event of the caller's own (a `gap`) at this point of the batch."""
        self._events.append(event)

    def take_events(self) -> list[Event]:
        """The batch's events, for the caller to commit; the next batch starts empty."""
        events, self._events, self._event_bytes = self._events, [], 0
        return events

    def drop_events(self) -> None:
        """The transaction rolled back: the events it would have committed never happened."""
        self._events.clear()
        self._event_bytes = 0

    def end_flush(self) -> None:
        """What was read ahead, left unwritten or opened belongs to a flush now over."""
        self._silent = False
        self._vanished.clear()
        self.forget()
        self._cache.close()

    def prefetch(self, hints: list[Hint]) -> None:
        """Read the index rows of the window's paths in a few queries instead of one each."""
        wanted: dict[str, list[bytes]] = {}
        for hint in hints:
            if isinstance(hint, Touch) and hint.path:
                wanted.setdefault(self._names[hint.root], []).append(key_of(hint.path))
        for root, keys in wanted.items():
            found = self._j.get_many(root, keys)
            for key in keys:
                self._known[(root, key)] = found.get(key)

    def forget(self) -> None:
        """End of a flush: what was read ahead or left unwritten belongs to a transaction now over."""
        self._known.clear()
        self._puts.clear()
        self._walked.clear()

    def _walked_in_this_flush(self, root: int, rel: bytes) -> bool:
        """Whether `rel` or a directory above it was walked whole during this flush, which began after
        every watch its hints speak of was placed."""
        while True:
            if (root, rel) in self._walked:
                return True
            if not rel:
                return False
            rel = rel.rpartition(b"/")[0]

    def write_index(self) -> None:
        """Write the buffered index rows (before anything reads the index through SQL, and at commit)."""
        if self._puts:
            self._j.put_many([(root, key, facts) for (root, key), facts in self._puts.items()])
            self._puts.clear()

    # The index, through the read-ahead and the write buffer -----------------------------------------

    def _get(self, root: str, key: bytes) -> Facts | None:
        k = (root, key)
        if k in self._puts:
            return self._puts[k]
        if k in self._known:
            return self._known.pop(k)
        return self._j.get(root, key)

    def _put(self, root: str, key: bytes, facts: Facts) -> None:
        self._known.pop((root, key), None)
        self._puts[(root, key)] = facts

    def _drop_tree(self, root: str, key: bytes, *, is_dir: bool = True) -> None:
        self.write_index()
        if is_dir:
            self._known.clear()
        else:
            self._known.pop((root, key), None)
        self._j.drop_tree(root, key)

    def _move_tree(self, root: str, src: bytes, dst: bytes) -> None:
        self.write_index()
        self._known.clear()
        self._j.move_tree(root, src, dst)

    # Entry points ---------------------------------------------------------------------------------

    def apply(self, hint: Touch | Move | Rescan, origin: Origin = "live") -> Iterator[None]:
        """Settle one hint. A `RootReplaced` is the caller's to turn into a `Rescan` of the whole root, once it
        has opened the root's path again (the reconciler reads the roots through descriptors it is given)."""
        if self._vanished:  # rare: no generator built for every hint when nothing is owed
            yield from self.close_vanished(hint)
        self._silent = self._silent_baseline and isinstance(hint, Rescan) and hint.origin == "baseline"
        if isinstance(hint, Touch):
            yield from self.touch(hint.root, hint.path, origin, created=hint.created, is_dir=hint.is_dir)
        elif isinstance(hint, Move):
            yield from self.move(hint, origin)
        else:
            yield from self.rescan(hint.root, hint.path, hint.recursive, hint.origin)

    def touch(
        self, root: int, rel: bytes, origin: Origin, *, links: bool = True, created: bool = False, is_dir: bool = False
    ) -> Iterator[None]:
        if not rel:
            return
        if created and is_dir:
            yield from self._created_dir(root, rel, origin)
            return
        key = key_of(rel)
        known = self._get(self._names[root], key)
        disk = self._disk(root, rel, known)
        if isinstance(disk, _Unknown):
            pass  # cannot be examined now (a directory above it unreadable): nothing to settle here
        elif disk is None and known is None and created and not self._present(root, rel):
            # It appeared and vanished before anyone could look: it existed, with facts unknown.
            bare = _bare("dir" if is_dir else "file")
            yield from self._emit("created", root, rel, None, bare, origin)
            yield from self._emit("deleted", root, rel, None, bare, origin)
            return
        elif disk is not None and disk.type != "dir" and (known is None or known.type == disk.type):
            self._file(root, rel, key, known, disk, origin)
            yield
        else:
            yield from self._settle(root, rel, key, known, disk, origin, descend=True, appeared=created)
        # A write through one name of a hard-linked file changes every name, and inotify told us of one.
        # The name may even be gone by now (deleted, moved away or replaced after the write), or beyond
        # examining (a directory above it unreadable): the other names of the inode it had still changed.
        # Its indexed link count is no guide then: a link made by another name's creation found in a walk
        # (`cp -al`) never updated it.
        if not links:
            return
        now = disk if isinstance(disk, Facts) else None
        if now is not None and now.type == "file" and (now.nlink or 0) > 1:
            yield from self._touch_links(root, key, now, origin)
        if (
            known is not None
            and known.type == "file"
            and known.ino is not None
            and (now is None or (now.dev, now.ino) != (known.dev, known.ino))
        ):
            yield from self._touch_links(root, key, known, origin)

    def _created_dir(self, root: int, rel: bytes, origin: Origin) -> Iterator[None]:
        """A directory the kernel reported created. Its index row, and its disk entry when it has none, are
        read once: for whether it vanished, and for the look at it."""
        key = key_of(rel)
        known = self._get(self._names[root], key)
        disk = self._disk(root, rel, None) if known is None else None
        if known is None and disk is None and not self._present(root, rel):
            # Gone before anyone looked, and unknown to the index.
            yield from self._emit("created", root, rel, None, _bare("dir"), origin)
            self._vanished.append((root, rel, origin))  # its `deleted` once its children's are recorded
            return
        # A directory the watcher has just watched: what it holds is only known from a look taken
        # after its watch, so look now, even if a walk of its parent saw it before the watch existed.
        if self._walked_in_this_flush(root, rel):
            return
        if self._ignored(root, rel):
            yield from self.touch(root, rel, origin)
            return
        if known is not None:
            disk = self._disk(root, rel, known)
        yield from self._rescan_at(root, rel, key, known, disk, True, origin)

    def close_vanished(self, hint: Touch | Move | Rescan | None = None) -> Iterator[None]:
        """The `deleted` of each vanished directory (deepest first) once the hints below it are settled:
        they follow the directory's own in kernel order, so the next hint elsewhere (or the end of the
        flush, `hint` None) closes it, and its children's events lie between its `created` and `deleted`."""
        path = None if hint is None else hint.src if isinstance(hint, Move) else hint.path
        while self._vanished:
            root, rel, origin = self._vanished[-1]
            if hint is not None and path is not None and hint.root == root and path.startswith(rel + b"/"):
                return
            self._vanished.pop()
            yield from self._emit("deleted", root, rel, None, _bare("dir"), origin)

    def _touch_links(self, root: int, key: bytes, linked: Facts, origin: Origin) -> Iterator[None]:
        self.write_index()
        me = (self._names[root], key)
        dev, ino = linked.dev or 0, linked.ino or 0
        others = [n for n in self._j.linked(dev, ino) if n != me]
        self._links_touched += bool(others)
        for other_root, other_key in others:
            if other_root in self._names:
                yield from self.touch(self._names.index(other_root), rel_of(other_key), origin, links=False)

    # Hard links with names out of sight -----------------------------------------------------------------

    def _note_links(self, disk: Facts) -> None:
        """A file with several links: whether the index holds a name for each is known only once the walk
        or window that found it is over, so it goes on the list and the next round (`recheck`) decides."""
        if disk.type == "file" and (disk.nlink or 0) > 1 and disk.ino is not None:
            self._recheck[(disk.dev or 0, disk.ino)] = None

    @property
    def recheck_pending(self) -> bool:
        """Whether any inode waits for a round: none, and the journal thread need not wake for it."""
        return bool(self._recheck)

    def recheck(self, budget: int = RECHECK_BUDGET) -> list[Hint]:
        """One round over up to `budget` inodes of the list, oldest first: a `Touch` of one indexed name of
        each that has more links than the index has names (its touch settles the other names too), which
        then goes back at the end of the list. An inode the index no longer holds, or holds a name for each
        link of, leaves it. Between flushes, on the journal thread (reads the index outside a transaction)."""
        hints: list[Hint] = []
        for ident in list(itertools.islice(self._recheck, budget)):
            del self._recheck[ident]
            names = [(root, key) for root, key in self._j.linked(*ident) if root in self._names]
            links = max((f.nlink or 0 for f in (self._j.get(r, k) for r, k in names) if f is not None), default=0)
            if links > len(names):
                self._recheck[ident] = None
                root, key = names[0]
                hints.append(Touch(self._names.index(root), rel_of(key)))
        return hints

    def move(self, hint: Move, origin: Origin) -> Iterator[None]:
        """A rename the kernel reported. It becomes one `moved` event when the index holds what moved
        (the inode at the new name is the indexed one, or the watcher vouched for the directory's inode,
        or the index holds entries below a directory created within this window); otherwise both names
        are simply looked at again."""
        root, name = hint.root, self._names[hint.root]
        if self._ignored(root, hint.src) or self._ignored(root, hint.dst):
            yield from self.touch(root, hint.src, origin)
            yield from self.touch(root, hint.dst, origin)
            return
        src_key, dst_key = key_of(hint.src), key_of(hint.dst)
        known = self._get(name, src_key)
        self.write_index()
        below = hint.is_dir and bool(self._j.below(name, src_key, b"", 1))
        disk = self._disk(root, hint.dst, known) if known is not None or below else None
        if isinstance(disk, _Unknown) or (known is None and not below):
            yield from self.touch(root, hint.src, origin)
            yield from self._look_again(root, hint.dst, hint.is_dir, origin)
            return
        if known is None:
            trusted = disk is None or disk.type == "dir"
            facts = disk if disk is not None else _bare("dir")
        else:
            trusted = self._trusted(hint, known, disk)
            facts = disk if disk is not None and same_entity(known, disk) else known
        if not trusted:
            yield from self.touch(root, hint.src, origin)
            yield from self._look_again(root, hint.dst, hint.is_dir, origin)
            return
        self._move_tree(name, src_key, dst_key)
        self._put(name, dst_key, facts)
        yield from self._emit("moved", root, hint.src, hint.dst, facts, origin)
        if disk is not None:  # when it has moved on, the hints of its next move or removal settle it
            yield from self._look_again(root, hint.dst, hint.is_dir, origin)

    def _look_again(self, root: int, rel: bytes, is_dir: bool, origin: Origin) -> Iterator[None]:
        """After a rename, the new name's own state, and for a directory its whole tree: changes hinted
        under the old name before the rename was read, and what the ignore rules say at the new place."""
        if is_dir:
            yield from self.rescan(root, rel, True, origin)
        else:
            yield from self.touch(root, rel, origin)

    def _trusted(self, hint: Move, known: Facts, disk: Facts | None) -> bool:
        if (known.type == "dir") != hint.is_dir:
            return False
        if hint.ino is not None and known.ino is not None:
            return hint.ino == known.ino  # the watcher saw this very directory at the new name
        if disk is not None:
            return same_entity(known, disk)
        # Nothing at the new name any more: it moved on (or was removed), unless what the index holds is
        # still at the old name; then something else moved (the second half of an exchange, say).
        at_src = self._disk(hint.root, hint.src, known)
        return not (isinstance(at_src, Facts) and same_entity(known, at_src) and known.ino is not None)

    def rescan(self, root: int, rel: bytes, recursive: bool, origin: Origin) -> Iterator[None]:
        """Diff a directory (and with `recursive` everything below it) against the index."""
        if rel:
            if self._ignored(root, rel):
                yield from self.touch(root, rel, origin)
                return
            key = key_of(rel)
            known = self._get(self._names[root], key)
            yield from self._rescan_at(root, rel, key, known, self._disk(root, rel, known), recursive, origin)
            return
        yield from self._walk(root, rel, origin, recursive=recursive)

    def _rescan_at(
        self, root: int, rel: bytes, key: bytes, known: Facts | None, disk: DiskState, recursive: bool, origin: Origin
    ) -> Iterator[None]:
        """`rescan` of a path out of the ignore rules, once its index row and disk entry are read."""
        if isinstance(disk, _Unknown):
            return
        if disk is None or known is None or disk.type != "dir" or known.type != "dir":
            yield from self._settle(root, rel, key, known, disk, origin, descend=True)
            return
        yield from self._settle(root, rel, key, known, disk, origin, descend=False)
        yield from self._walk(root, rel, origin, recursive=recursive or not same_entity(known, disk))

    # The comparison of one path -------------------------------------------------------------------

    def _settle(
        self,
        root: int,
        rel: bytes,
        key: bytes,
        known: Facts | None,
        disk: Facts | None,
        origin: Origin,
        *,
        descend: bool,
        appeared: bool = False,
    ) -> Iterator[None]:
        """Make the index (and the trail) say what the disk says at `rel`. The index is keyed by path:
        a file replaced by another file is `updated` when its content differs. A directory replaced by
        another one is diffed entry by entry, since what was written into it before its watch existed is
        only found by looking: another one by inode, or by the kernel's word (`appeared`) when the new one
        has the old one's inode (ext4 reuses them at once)."""
        name = self._names[root]
        if disk is None:
            if known is not None:
                yield from self._delete(root, rel, key, known, origin)
            return
        self._note_links(disk)
        if known is not None and known.type != disk.type:
            yield from self._delete(root, rel, key, known, origin)
            known = None
        if known is None:
            self._put(name, key, disk)
            yield from self._emit("created", root, rel, None, disk, origin)
            if disk.type == "dir" and descend:
                yield from self._walk(root, rel, origin, recursive=True)
            return
        changed = content_changed(known, disk)
        if changed:
            self._put(name, key, disk)
            yield from self._emit("updated", root, rel, None, disk, origin)
        elif _restat(known, disk):
            self._put(name, key, disk)
        # Another directory at this name, or new permissions (what it held while we could not read it
        # was never seen): look at everything below it.
        if disk.type == "dir" and descend and (changed or appeared or not same_entity(known, disk)):
            yield from self._walk(root, rel, origin, recursive=True)

    def _file(self, root: int, rel: bytes, key: bytes, known: Facts | None, disk: Facts, origin: Origin) -> None:
        """`_settle` for the common case, a file or symlink that appeared or changed, without the
        generators that a directory (a walk) or a removal (a subtree) need."""
        self._note_links(disk)
        if known is None:
            self._put(self._names[root], key, disk)
            self._record("created", root, rel, None, disk, origin)
        elif content_changed(known, disk):
            self._put(self._names[root], key, disk)
            self._record("updated", root, rel, None, disk, origin)
        elif _restat(known, disk):
            self._put(self._names[root], key, disk)

    def _delete(self, root: int, rel: bytes, key: bytes, known: Facts, origin: Origin) -> Iterator[None]:
        """`deleted` for everything the index holds below `rel` (deepest first), then for `rel` itself."""
        name = self._names[root]
        if known.type == "dir":
            self.write_index()
            for sub_key, sub_type in list(self._j.below_reversed(name, key)):
                self._drop_tree(name, sub_key, is_dir=sub_type == "dir")
                yield from self._emit("deleted", root, rel_of(sub_key), None, _bare(sub_type), origin)
        self._drop_tree(name, key, is_dir=known.type == "dir")
        yield from self._emit("deleted", root, rel, None, known, origin)

    # Walks ------------------------------------------------------------------------------------------

    def _walk(self, root: int, rel: bytes, origin: Origin, *, recursive: bool) -> Iterator[None]:
        """Merge the directory listing(s) below `rel` with the index below it, both in key order (depth
        first, names sorted), and settle every difference."""
        if recursive:
            self._walked.add((root, rel))
        try:
            fd = self._cache.get(root, rel)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise
            if exc.errno in ABSENT_ERRNOS:
                yield from self.touch(root, rel, origin)
            return  # unreadable: what is below stays as the index has it
        name = self._names[root]
        disk = self._counted(entries(self._rules, root, rel, fd, recursive))
        index = self._index_entries(name, key_of(rel), recursive)
        d, i = next(disk, None), next(index, None)
        gone: bytes | None = None  # the index subtree below a directory just deleted or replaced
        kept: bytes | None = None  # below an entry we may not look into: the index stays as it is
        while d is not None or i is not None:
            if i is not None and (
                (gone is not None and i[0].startswith(gone))
                or (kept is not None and (i[0].startswith(kept) or i[0] == kept[:-1]))
            ):
                i = next(index, None)
                continue
            if d is not None and (i is None or d.key < i[0]):
                if d.facts is not None:
                    full = self._hashed(root, d, None)
                    yield from self._settle(root, d.rel, d.key, None, full, origin, descend=not recursive)
                    yield from self._linked_news(root, d.key, None, full, origin)
                if d.facts is None or d.unlistable:
                    kept = d.key + b"\x00"
                d = next(disk, None)
            elif i is not None and (d is None or i[0] < d.key):
                ikey, ifacts = i
                yield from self._delete(root, rel_of(ikey), ikey, ifacts, origin)
                gone = ikey + b"\x00"
                i = next(index, None)
            else:
                assert d is not None and i is not None  # the same key on both sides
                ikey, ifacts = i
                if d.facts is None or d.unlistable:
                    kept = d.key + b"\x00"
                if d.facts is not None:
                    full = self._hashed(root, d, ifacts)
                    if full is None or full.type != ifacts.type:
                        gone = ikey + b"\x00"
                    yield from self._settle(root, d.rel, d.key, ifacts, full, origin, descend=not recursive)
                    yield from self._linked_news(root, d.key, ifacts, full, origin)
                d, i = next(disk, None), next(index, None)

    def _counted(self, listed: Iterator[DiskEntry]) -> Iterator[DiskEntry]:
        for entry in listed:
            self.entries_walked += 1
            yield entry

    def _linked_news(
        self, root: int, key: bytes, known: Facts | None, disk: Facts | None, origin: Origin
    ) -> Iterator[None]:
        """A walk found a hard-linked file new or changed at this name: whatever wrote it (while its
        directory was outside the tree, or the daemon down) changed its other names too, and no event of
        theirs said so."""
        if disk is None or disk.type != "file" or (disk.nlink or 0) < 2:
            return
        if known is None or known.type != "file" or content_changed(known, disk):
            yield from self._touch_links(root, key, disk, origin)

    def _hashed(self, root: int, entry: DiskEntry, known: Facts | None) -> Facts | None:
        """The entry's facts with its hash (reused from the index when the stat says nothing changed)."""
        facts, st = entry.facts, entry.st
        assert facts is not None and st is not None
        if facts.type == "dir":
            return facts
        if known is not None and known.sha256 is not None and facts.same_stat(known):
            facts.sha256 = known.sha256
            return facts
        try:
            self.hashing.where = (self._names[root], entry.rel)
            return read_facts(entry.dir_fd, entry.name, st, known, self._hash_max, self.hashing)
        except Unreadable:
            facts.sha256 = known.sha256 if known is not None and facts.same_stat(known) else None
            return facts
        except OSError as exc:
            if exc.errno in ABSENT_ERRNOS:
                return None
            raise

    def _index_entries(self, root_name: str, top: bytes, recursive: bool) -> Iterator[tuple[bytes, Facts]]:
        """The index below `top` in key order: all of it, or only the direct children (jumping over the
        subtree of each child with one query instead of reading it)."""
        depth = top.count(b"\x00") + 1 if top else 0
        start = subtree_bounds(top)[0]
        while True:
            self.write_index()
            rows = self._j.below(root_name, top, start, CHUNK)
            if not rows:
                return
            for key, facts in rows:
                if recursive or key.count(b"\x00") == depth:
                    touched = self._links_touched
                    yield key, facts
                    start = key + b"\x00"
                    if self._links_touched != touched:
                        break  # other names of a file were settled meanwhile: read on from the index as it is
                else:
                    start = b"\x00".join(key.split(b"\x00")[: depth + 1]) + b"\x01"
                    break
            else:
                if len(rows) < CHUNK:
                    return

    # Helpers -----------------------------------------------------------------------------------------

    def hashing_status(self) -> dict[str, object] | None:
        """Any thread: the file being hashed now (/status `pipeline.hashing`), None between hashes."""
        now = self.hashing.current
        if now is None:
            return None
        path, done, total, since = now
        return {"path": path, "bytes_done": done, "bytes_total": total, "since": rfc3339(since)}

    def _ignored(self, root: int, rel: bytes) -> bool:
        return self._rules.ignored(root, rel, False) and self._rules.ignored(root, rel, True)

    def _disk(self, root: int, rel: bytes, known: Facts | None) -> DiskState:
        parent, entry = split(rel)
        try:
            dfd = self._cache.get(root, parent)
            st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and self._rules.private_file(st.st_dev, st.st_ino):
                return None  # a hard link to the daemon's own file: never opened, out of the trail
            self.hashing.where = (self._names[root], rel)
            facts = read_facts(dfd, entry, st, known, self._hash_max, self.hashing)
        except Unreadable:
            return UNKNOWN
        except OSError as exc:
            if exc.errno in ABSENT_ERRNOS:
                return None
            if exc.errno in (13, 1):  # EACCES, EPERM on a parent
                return UNKNOWN
            raise
        if facts is not None and excluded(self._rules, root, rel, facts):
            return None  # ignored where it is now: out of the trail
        return facts

    def _present(self, root: int, rel: bytes) -> bool:
        """Whether something is at `rel` now, though out of the trail (a link to the daemon's own file)."""
        parent, entry = split(rel)
        try:
            return lstat_at(self._cache.get(root, parent), entry) is not None
        except (OSError, Unreadable):
            return False

    def _emit(
        self, action: Action, root: int, rel: bytes, dest: bytes | None, facts: Facts, origin: Origin
    ) -> Iterator[None]:
        """Record an event, then let the caller commit if the batch is full."""
        self._record(action, root, rel, dest, facts, origin)
        yield

    def _record(self, action: Action, root: int, rel: bytes, dest: bytes | None, facts: Facts, origin: Origin) -> None:
        if not self._silent:
            self._events.append(self._factory.observed(action, root, rel, dest, facts, origin))
            self._event_bytes += 200 + len(rel) + (len(dest) if dest else 0)


def _bare(kind: str) -> Facts:
    """An entry whose facts are unknown: only its type (from the index, or what the kernel said)."""
    return Facts(cast(EntryType, kind), None, None, None, None, None, None, None)
