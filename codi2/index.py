"""The file-state index and the scans that diff a tree against it.

`<state dir>/index.db` (SQLite) holds, for every entry the trail says exists, its type, size, mtime_ns,
inode and sha256. It is updated in the same worker thread, right after each batch is made durable in the
spool, and records the spool position it reflects; on start-up it is rolled forward from the spool. So
it always equals the state the trail implies, and a walk diffed against it yields exactly the changes
the trail is missing: after downtime (`offline`), after a queue overflow or for unwatched directories
(`rescan`).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from codi2.events import Event, Origin
from codi2.spool import Facts
from codi2.watcher import Change, IgnoreRules

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    root     TEXT NOT NULL,
    path     BLOB NOT NULL,
    type     TEXT NOT NULL,
    size     INTEGER,
    mtime_ns INTEGER,
    inode    INTEGER,
    sha256   TEXT,
    PRIMARY KEY (root, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    type: str
    size: int | None
    mtime_ns: int | None
    inode: int | None


def _subtree_range(path: bytes) -> tuple[bytes, bytes]:
    """Every path strictly below `path`: `path/` up to `path0` ('0' is the byte after '/')."""
    return path + b"/", path + b"0"


class FileIndex:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def position(self) -> tuple[str, int] | None:
        """The spool position (segment, end offset) of the last batch applied."""
        value = self._meta("spool_position")
        if value is None:
            return None
        segment, offset = value.split()
        return segment, int(offset)

    @property
    def initialized(self) -> bool:
        return self._meta("initialized") == "1"

    def apply(self, events: Iterable[Event], facts: Iterable[Facts], position: tuple[str, int]) -> None:
        """Fold one durable batch into the index, with its spool position, in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for event, (inode, mtime_ns) in zip(events, facts, strict=True):
                path = os.fsencode(event.path)
                if event.action in ("created", "updated"):
                    self._put(event.root, path, event.type, event.size, mtime_ns, inode, event.sha256)
                elif event.action == "deleted":
                    self._drop_tree(event.root, path)
                elif event.action == "moved" and event.dest_path is not None:
                    dest = os.fsencode(event.dest_path)
                    low, high = _subtree_range(path)
                    rows = db.execute(
                        "SELECT path, type, size, mtime_ns, inode, sha256 FROM files"
                        " WHERE root = ? AND path >= ? AND path < ?",
                        (event.root, low, high),
                    ).fetchall()
                    self._drop_tree(event.root, path)
                    self._drop_tree(event.root, dest)
                    for child, *rest in rows:
                        self._put(event.root, dest + child[len(path) :], *rest)
                    self._put(event.root, dest, event.type, event.size, mtime_ns, inode, event.sha256)
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('spool_position', ?), ('initialized', '1')",
                (f"{position[0]} {position[1]}",),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _put(self, root: str, path: bytes, *values: object) -> None:
        self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", (root, path, *values))

    def _drop_tree(self, root: str, path: bytes) -> None:
        low, high = _subtree_range(path)
        self._db.execute(
            "DELETE FROM files WHERE root = ? AND (path = ? OR (path >= ? AND path < ?))", (root, path, low, high)
        )

    def below(self, root: str, path: bytes) -> list[tuple[bytes, str]]:
        """Entries strictly below `path` (all of the root for b""), deepest first."""
        if path:
            low, high = _subtree_range(path)
            rows = self._db.execute(
                "SELECT path, type FROM files WHERE root = ? AND path >= ? AND path < ?", (root, low, high)
            ).fetchall()
        else:
            rows = self._db.execute("SELECT path, type FROM files WHERE root = ?", (root,)).fetchall()
        return sorted(rows, reverse=True)

    def entries(self, root: str, top: bytes) -> dict[bytes, Entry]:
        if top:
            low, high = _subtree_range(top)
            cursor = self._db.execute(
                "SELECT path, type, size, mtime_ns, inode FROM files"
                " WHERE root = ? AND (path = ? OR (path >= ? AND path < ?))",
                (root, top, low, high),
            )
        else:
            cursor = self._db.execute("SELECT path, type, size, mtime_ns, inode FROM files WHERE root = ?", (root,))
        return {path: Entry(*rest) for path, *rest in cursor}

    def baseline(self, root: str, disk: dict[bytes, Entry]) -> None:
        """Record what is there as the starting state, without events (`initial_scan = "baseline"`)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM files WHERE root = ?", (root,))
            db.executemany(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, NULL)",
                [(root, p, e.type, e.size, e.mtime_ns, e.inode) for p, e in disk.items()],
            )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('initialized', '1')")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


def _entry(st: os.stat_result) -> Entry:
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir", None, None, st.st_ino)
    kind = "symlink" if stat.S_ISLNK(st.st_mode) else "file"
    return Entry(kind, st.st_size, st.st_mtime_ns, st.st_ino)


def walk(root: bytes, top: bytes, rules: IgnoreRules) -> Iterator[tuple[bytes, Entry]]:
    """Every non-ignored entry below `root/top` (and `top` itself, unless it is the root), never
    following symlinks. Unreadable directories are skipped: the watcher reports them."""
    if top:
        try:
            st = os.lstat(os.path.join(root, top))
        except OSError:
            return
        yield top, _entry(st)
        if not stat.S_ISDIR(st.st_mode):
            return
    stack = [top]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                entries = list(it)
        except OSError:
            continue
        for item in entries:
            child = os.path.join(rel, item.name) if rel else item.name
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if rules.ignored(item.path, child, is_dir):
                continue
            yield child, _entry(st)
            if is_dir:
                stack.append(child)


def diff(
    root_index: int, disk: dict[bytes, Entry], indexed: dict[bytes, Entry], origin: Origin, now: float
) -> list[Change]:
    """The changes that turn `indexed` into `disk`: deletions deepest first, then creations parents
    first; a path whose type changed is deleted and created again."""
    changes = []
    for path in sorted(indexed, reverse=True):
        known = indexed[path]
        found = disk.get(path)
        if found is None or found.type != known.type:
            changes.append(Change("deleted", root_index, path, None, known.type == "dir", now, origin))
    for path in sorted(disk):
        found = disk[path]
        known = indexed.get(path)
        if known is None or known.type != found.type:
            changes.append(Change("created", root_index, path, None, found.type == "dir", now, origin))
        elif found.type != "dir" and (found.size, found.mtime_ns, found.inode) != (
            known.size,
            known.mtime_ns,
            known.inode,
        ):
            changes.append(Change("updated", root_index, path, None, False, now, origin))
    return changes
