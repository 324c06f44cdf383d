"""File-system access relative to directory descriptors: no path length limit, no symlink followed.

Every path the daemon reads is a relative path under a watch root, opened one component at a time with
`O_NOFOLLOW` from a descriptor of the root. So a tree deeper than PATH_MAX is as reachable as a shallow
one, and a directory swapped for a symlink between a change and its handling cannot lead the daemon
outside the workspace. Paths are `bytes` with `/` separators, relative to their root (`b""` is the root).
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

EntryType = Literal["file", "dir", "symlink"]

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
# What "not there" looks like from a path: the entry or a parent is gone, or a parent is not a directory
# (ELOOP: a component is now a symlink, which the tree never follows).
ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
# Out of descriptors or memory: the process's state, not the entry's. Never read as "this directory may
# not be looked at" (which leaves its subtree as the index has it): the work fails, is reported, and is
# done again.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
HASH_CHUNK = 1 << 20
# File timestamps tick coarsely: a write in the same tick right after the hash would leave the stat as it
# was. A hash taken within this long of the file's ctime is not trusted to skip the next one ("racy").
RACY_NS = 2_000_000_000


@dataclass(slots=True)
class Facts:
    """What an entry is on disk. `sha256` is None for anything but a readable regular file within the
    hashing limit, `target` for anything but a symlink; `None` stat fields mean "not known" (for example
    after an index rebuild from a trail written before events carried the owner)."""

    type: EntryType
    size: int | None
    mode: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    ino: int | None
    dev: int | None
    nlink: int | None
    sha256: str | None = None
    uid: int | None = None
    gid: int | None = None
    target: bytes | None = None  # a symlink's target, exactly as readlink gives it

    def same_stat(self, other: Facts) -> bool:
        """True when nothing a content change touches differs (ctime moves with every write, chmod and
        link, so `cp -p` or `tar` keeping size and mtime is still seen)."""
        return (
            self.ino == other.ino
            and self.size == other.size
            and self.mtime_ns == other.mtime_ns
            and self.ctime_ns == other.ctime_ns
            and other.ctime_ns is not None
        )


class Unreadable(Exception):
    """The entry exists but the daemon may not look at it (EACCES): its state is unknown, not gone."""


def kind_of(mode: int) -> EntryType:
    if stat.S_ISDIR(mode):
        return "dir"
    return "symlink" if stat.S_ISLNK(mode) else "file"


def facts_of(st: os.stat_result) -> Facts:
    mode = st.st_mode
    kind: EntryType = "file" if stat.S_ISREG(mode) else kind_of(mode)
    return Facts(
        kind,
        None if kind == "dir" else st.st_size,
        stat.S_IMODE(st.st_mode),
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        None,
        st.st_uid,
        st.st_gid,
    )


def split(rel: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a relative path; the parent of a top-level entry is b""."""
    parent, _, name = rel.rpartition(b"/")
    return parent, name


def key_of(rel: bytes) -> bytes:
    """The index's key of a relative path: `/` as NUL, so that key order is depth-first order."""
    return rel.replace(b"/", b"\x00")


def rel_of(key: bytes) -> bytes:
    """The relative path of an index key."""
    return key.replace(b"\x00", b"/")


def subtree_bounds(key: bytes) -> tuple[bytes, bytes]:
    """Keys strictly below `key` lie in [low, high); the whole root for b"". No file name reaches 4096 bytes
    (PATH_MAX bounds what a system call takes), so every key is below 4096 bytes of 0xff: a name of eight or more
    0xff bytes (eight was the bound) is a name like any other."""
    if not key:
        return b"", b"\xff" * 4096
    return key + b"\x00", key + b"\x01"


def open_dir(root_fd: int, rel: bytes) -> int:
    """A new descriptor of the directory `rel` below `root_fd`, never through a symlink."""
    fd = os.dup(root_fd)
    if not rel:
        return fd
    try:
        for part in rel.split(b"/"):
            child = os.open(part, O_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class DirCache:
    """Directory descriptors opened during one unit of work (a flush, a walk), reused by every entry
    below them and closed together. Directories change identity between units, so nothing outlives one."""

    MAX_OPEN = 256

    def __init__(self, root_fds: list[int]) -> None:
        self._roots = root_fds
        self._open: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        # An eighth of the descriptors the process may hold at most: the walks and the watcher need theirs.
        self._max_open = max(4, min(self.MAX_OPEN, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8))

    def get(self, root: int, rel: bytes) -> int:
        """The descriptor of directory `rel` (borrowed: valid until the next `get` or `close`), opened
        from the nearest cached ancestor one component at a time. Out of descriptors, it gives back every
        one it caches and tries once more. Raises OSError."""
        try:
            return self._get(root, rel)
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRNOS or not self._open:
                raise
        self.close()
        return self._get(root, rel)

    def _get(self, root: int, rel: bytes) -> int:
        key = (root, rel)
        fd = self._open.get(key)
        if fd is not None:
            self._open.move_to_end(key)
            return fd
        missing = []  # the components below the nearest ancestor already open
        ancestor = rel
        while ancestor and (root, ancestor) not in self._open:
            ancestor, name = split(ancestor)
            missing.append(name)
        fd = os.dup(self._open[(root, ancestor)] if ancestor or (root, b"") in self._open else self._roots[root])
        try:
            for name in reversed(missing):
                child = os.open(name, O_DIR, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        self._open[key] = fd
        if len(self._open) > self._max_open:
            _, oldest = self._open.popitem(last=False)
            os.close(oldest)
        return fd

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def lstat_at(dir_fd: int, name: bytes) -> Facts | None:
    """The entry's facts without its hash; None when absent. Raises Unreadable."""
    try:
        return facts_of(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    except OSError as exc:
        if exc.errno in ABSENT_ERRNOS:
            return None
        if exc.errno == errno.EACCES:
            raise Unreadable(name) from None
        raise


class HashProgress:
    """The hash being computed, for /status: a multi-GB file takes seconds to minutes, with no change
    pending meanwhile to show for it. The hashing thread replaces `current` (path, bytes done, bytes in
    all, start time) once per chunk, so a reader on another thread sees one consistent tuple."""

    def __init__(self) -> None:
        # What the next `read_facts` hashes (its root's path and the entry's relative path), set by its caller
        # for every file; spelled out as a path only for a file big enough to be reported.
        self.where: tuple[str, bytes] = ("", b"")
        self.current: tuple[str, int, int, float] | None = None

    @property
    def path(self) -> str:
        root, rel = self.where
        return os.path.join(root, os.fsdecode(rel))


def read_facts(
    dir_fd: int,
    name: bytes,
    st: os.stat_result,
    known: Facts | None,
    hash_max: int,
    progress: HashProgress | None = None,
) -> Facts | None:
    """The entry's facts with the sha256 of a regular file, read through one descriptor (open, fstat,
    read): the hash belongs to exactly the inode the stat describes. `st` is the entry's lstat, taken by
    the caller: only a regular file is ever opened, for opening a FIFO counts as its reader (a writer
    waiting for one would be released, then write into a pipe nobody reads) and opening a device may act
    on it. The hash of `known` is reused when the stat says nothing changed. None when absent; raises
    Unreadable when it may not be examined.

    A write racing the read has its own inotify event, read after this window, so it is looked at again;
    and a hash taken within RACY_NS of the file's ctime never lets the next look skip hashing, for a
    write in the same timestamp tick would leave the stat unchanged. A file of more than one chunk is
    reported to `progress` while it is read.

    A symlink's facts carry its target: `ln -sfn` retargets a link, and a fold rebuilds the tree from it."""
    if stat.S_ISLNK(st.st_mode):
        return _link_facts(dir_fd, name, st, known, hash_max, progress)
    if not stat.S_ISREG(st.st_mode):
        return facts_of(st)
    try:
        fd = os.open(name, O_FILE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in ABSENT_ERRNOS and exc.errno != errno.ELOOP:
            return None
        if exc.errno in RESOURCE_ERRNOS:
            raise
        # replaced since the lstat (O_NOFOLLOW), or a file we may not open (EACCES, EIO, ...): its stat is
        # still known, and one file's error must not fail the batch every other change waits on
        facts = lstat_at(dir_fd, name)
        if facts is not None and facts.type == "file" and known is not None and facts.same_stat(known):
            facts.sha256 = known.sha256
        return facts
    try:
        st = os.fstat(fd)
        facts = facts_of(st)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode) or size > hash_max:
            return facts
        if known is not None and known.sha256 is not None and facts.same_stat(known):
            facts.sha256 = known.sha256
            return facts
        digest, total = hashlib.sha256(), 0
        want = size + 1 if size < HASH_CHUNK else HASH_CHUNK
        report = progress if size >= HASH_CHUNK else None
        # The clock is read only for a hash /status reports: most files are small, read in one go.
        path, started = ("", 0.0) if report is None else (report.path, time.time())
        while chunk := os.read(fd, want):
            total += len(chunk)
            if total > hash_max:
                # Grown past the limit while read, or a pseudo-file (/proc, /sys) whose size says nothing
                # of what it yields: no hash, as for any file over the limit, and never an endless read.
                return facts
            if report is not None:
                report.current = (path, total, size, started)
            digest.update(chunk)
            if total <= size < HASH_CHUNK:
                break  # a small file in one read: a shorter answer than asked is the end of the file
            want = HASH_CHUNK
        facts.sha256 = digest.hexdigest()
        if time.time_ns() - st.st_ctime_ns < RACY_NS:
            facts.ctime_ns = None
        return facts
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise Unreadable(name) from None
        if exc.errno in RESOURCE_ERRNOS:
            raise
        return facts_of(st)  # its contents refused (EIO, a pseudo-file's EINVAL): the stat is still known
    finally:
        os.close(fd)
        if progress is not None:
            progress.current = None


def _link_facts(
    dir_fd: int, name: bytes, st: os.stat_result, known: Facts | None, hash_max: int, progress: HashProgress | None
) -> Facts | None:
    facts = facts_of(st)
    try:
        facts.target = os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in ABSENT_ERRNOS:
            return None
        if exc.errno == errno.EACCES:
            raise Unreadable(name) from None
        if exc.errno != errno.EINVAL:
            raise
        # No longer a symlink since the lstat: what is there now, read afresh.
        try:
            fresh = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as again:
            if again.errno in ABSENT_ERRNOS:
                return None
            raise
        return read_facts(dir_fd, name, fresh, known, hash_max, progress)
    return facts


def list_dir(fd: int) -> list[tuple[bytes, bool | None, int]]:
    """(name, is_dir, inode) of every entry, sorted by name; is_dir None when the type is unknown."""
    out = []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                is_dir: bool | None = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = None
            out.append((os.fsencode(entry.name), is_dir, entry.inode()))
    out.sort()
    return out
