"""The one walk of a tree: what the daemon's reconciler diffs against the index, what `codi2 verify --disk`
compares with the trail, and what the tests check a trail against. One walk, so that the check reads the
disk exactly as the daemon does: lstat first, only regular files opened (a FIFO, socket or device is a
file without a hash), nothing followed, no PATH_MAX limit, the same hashing limit, the same ignore rules
(patterns, and the daemon's own places by path and by identity).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from codi2.disk.fs import ABSENT_ERRNOS, O_DIR, RESOURCE_ERRNOS, Facts, Unreadable, facts_of, key_of, read_facts
from codi2.disk.ignore import IgnoreRules


@dataclass(slots=True)
class DiskEntry:
    """One entry of a walk: its lstat and the facts from it (no hash yet), both None when it may not be
    examined; `unlistable` marks a directory whose listing failed: what the index holds below either
    stays untouched. `key` is the index's form of `rel` (`/` as NUL), whose byte order is the walk's."""

    key: bytes
    rel: bytes
    name: bytes
    dir_fd: int
    st: os.stat_result | None
    facts: Facts | None
    unlistable: bool = False


def entries(rules: IgnoreRules, root: int, rel: bytes, fd: int, recursive: bool) -> Iterator[DiskEntry]:
    """Entries below `rel` (whose descriptor is `fd`) in key order (depth first, names sorted), one
    descriptor held per level; `dir_fd` of an entry stays open until the next entry is asked for. An
    entry or listing that cannot be read is marked; running out of descriptors or memory raises."""
    stack: list[tuple[bytes, int, list[bytes]]] = [(rel, os.dup(fd), [])]
    try:
        stack[0] = (rel, stack[0][1], _names_in(stack[0][1]))
    except OSError as exc:
        os.close(stack.pop()[1])
        if exc.errno in RESOURCE_ERRNOS:
            raise
        return
    try:
        while stack:
            parent, pfd, pending = stack[-1]
            if not pending:
                os.close(pfd)
                stack.pop()
                continue
            entry = pending.pop()
            child = parent + b"/" + entry if parent else entry
            key = key_of(child)
            st: os.stat_result | None
            try:
                st = os.stat(entry, dir_fd=pfd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in ABSENT_ERRNOS:
                    continue  # gone between the listing and the stat
                st = None
            facts = None if st is None else facts_of(st)
            if facts is not None and excluded(rules, root, child, facts):
                continue
            if facts is None or facts.type != "dir" or not recursive:
                yield DiskEntry(key, child, entry, pfd, st, facts)
                continue
            try:
                cfd = os.open(entry, O_DIR, dir_fd=pfd)
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    raise
                yield DiskEntry(key, child, entry, pfd, st, facts, unlistable=True)
                continue
            try:
                names = _names_in(cfd)
            except OSError as exc:
                os.close(cfd)
                if exc.errno in RESOURCE_ERRNOS:
                    raise
                yield DiskEntry(key, child, entry, pfd, st, facts, unlistable=True)
                continue
            yield DiskEntry(key, child, entry, pfd, st, facts)
            stack.append((child, cfd, names))
    finally:
        for _, pfd, _ in stack:
            os.close(pfd)


def _names_in(fd: int) -> list[bytes]:
    """Names in a directory, sorted in reverse so that `pop()` gives them in key order."""
    with os.scandir(fd) as it:
        names = [os.fsencode(e.name) for e in it]
    names.sort(reverse=True)
    return names


def excluded(rules: IgnoreRules, root: int, rel: bytes, facts: Facts) -> bool:
    """Out of the trail: ignored at this path, or the daemon's own directory or file under any name."""
    is_dir = facts.type == "dir"
    if rules.ignored(root, rel, is_dir):
        return True
    return rules.private_dir(facts.dev, facts.ino) if is_dir else rules.private_file(facts.dev, facts.ino)


@dataclass(frozen=True, slots=True)
class Seen:
    """An entry as the daemon would index it. `facts` is None when the entry could not be examined;
    `problem` says what of it could not be read (the entry, a directory's listing, a file's contents),
    None when everything could."""

    rel: bytes
    facts: Facts | None
    problem: str | None = None


def walk(path: Path, rules: IgnoreRules, hash_max: int, root: int = 0) -> Iterator[Seen]:
    """Every entry below `path` (the watch root `root` of `rules`) in key order, files hashed up to
    `hash_max` bytes. What cannot be read is reported in its `Seen`, never raised: a workspace user can
    plant anything (a FIFO, a device, an unreadable tree), and `/proc` or `/sys` hold files that fail to
    read. Raises OSError when `path` itself cannot be opened, or the process runs out of descriptors."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for entry in entries(rules, root, b"", fd, recursive=True):
            seen = _seen(entry, hash_max)
            if seen is not None:
                yield seen
    finally:
        os.close(fd)


def _seen(entry: DiskEntry, hash_max: int) -> Seen | None:
    """The entry with its hash; None when it is gone since it was listed."""
    facts, st = entry.facts, entry.st
    if facts is None or st is None:
        return Seen(entry.rel, None, "could not be examined")
    if entry.unlistable:
        return Seen(entry.rel, facts, "its entries could not be listed")
    if facts.type == "dir":
        return Seen(entry.rel, facts)
    try:
        hashed = read_facts(entry.dir_fd, entry.name, st, None, hash_max)
    except Unreadable:
        return Seen(entry.rel, facts, "its contents could not be read: permission denied")
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            raise
        if exc.errno in ABSENT_ERRNOS:
            return None
        return Seen(entry.rel, facts, f"its contents could not be read: {exc.strerror or exc}")
    if hashed is None:
        return None
    if hashed.sha256 is None and stat.S_ISREG(st.st_mode) and st.st_size <= hash_max:
        # Within the limit but not hashed: it could not be opened (permission, a lease), or it yielded more
        # than the limit by the time it was read (grown meanwhile, or a /proc file whose size is 0).
        return Seen(entry.rel, hashed, "its contents could not be read (not permitted, or past hash_max_bytes)")
    return Seen(entry.rel, hashed)
