"""The file-state index: the `files` table, every entry the trail says exists, with the stat facts and
sha256 last seen.

The key is the path relative to its root with `/` written as `\\x00`, so key order is depth-first order (a
directory, then everything below it, then its next sibling) and a subtree is one key range. Roots are
stored once (`roots`), rows carry their small id. Only the journal thread uses it, inside the journal's
transactions (`codi2.journal.journal`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

from codi2.disk.fs import Facts, subtree_bounds

LOOKUP_CHUNK = 500  # host parameters per IN (...) query
FACT_COLUMNS = "type, size, mode, mtime_ns, ctime_ns, ino, dev, nlink, sha256, uid, gid, target"
PUT_SQL = "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


# SQLite's INTEGER is 64-bit signed; the kernel's values are not all within it: an mtime after 2262-04-11 is
# past 2**63 nanoseconds, and inode and device numbers are unsigned 64-bit. Such a value is stored as a BLOB
# of its decimal digits (a BLOB is never converted by column affinity, unlike text, which would become a
# lossy REAL), and read back as the same int. Only those rows pay for it: the common path binds plain ints.
_INT64 = range(-(2**63), 2**63)
_WIDE = (1, 2, 3, 4, 5, 6, 7)  # size, mode, mtime_ns, ctime_ns, ino, dev, nlink in a row of FACT_COLUMNS


def _wide(value: Any) -> Any:
    return str(value).encode() if isinstance(value, int) and value not in _INT64 else value


def _int(value: Any) -> Any:
    return int(value) if isinstance(value, bytes) else value


def _facts(row: tuple[Any, ...]) -> Facts:
    if bytes in (type(row[3]), type(row[4]), type(row[5]), type(row[6])):
        return Facts(*(_int(v) if i in _WIDE else v for i, v in enumerate(row)))
    return Facts(*row)


def _values(f: Facts) -> tuple[Any, ...]:
    return (f.type, f.size, f.mode, f.mtime_ns, f.ctime_ns, f.ino, f.dev, f.nlink, f.sha256, f.uid, f.gid, f.target)


def _wide_values(f: Facts) -> tuple[Any, ...]:
    return tuple(_wide(v) for v in _values(f))


class Index:
    """Queries and updates of the `files` table on the owner's connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._root_ids: dict[str, int] = {}

    def _root(self, path: str, *, create: bool = False) -> int | None:
        """The small id a root's rows carry (its path once, not in every row); None if it has none."""
        found = self._root_ids.get(path)
        if found is None:
            row = self._db.execute("SELECT id FROM roots WHERE path = ?", (path,)).fetchone()
            if row is None and create:
                row = (self._db.execute("INSERT INTO roots (path) VALUES (?)", (path,)).lastrowid,)
            if row is not None:
                found = self._root_ids[path] = row[0]
        return found

    def get(self, root: str, key: bytes) -> Facts | None:
        row = self._db.execute(
            f"SELECT {FACT_COLUMNS} FROM files WHERE root = ? AND key = ?", (self._root(root), key)
        ).fetchone()
        return _facts(row) if row else None

    def get_many(self, root: str, keys: list[bytes]) -> dict[bytes, Facts]:
        out: dict[bytes, Facts] = {}
        for i in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[i : i + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, *rest in self._db.execute(
                f"SELECT key, {FACT_COLUMNS} FROM files WHERE root = ? AND key IN ({marks})", (self._root(root), *chunk)
            ):
                out[key] = _facts(tuple(rest))
        return out

    def below(self, root: str, key: bytes, start: bytes, limit: int) -> list[tuple[bytes, Facts]]:
        """Up to `limit` entries strictly below `key` from `start` on (inclusive), in key order."""
        low, high = subtree_bounds(key)
        rows = self._db.execute(
            f"SELECT key, {FACT_COLUMNS} FROM files WHERE root = ? AND key >= ? AND key < ? ORDER BY key LIMIT ?",
            (self._root(root), max(low, start), high, limit),
        )
        return [(k, _facts(tuple(rest))) for k, *rest in rows]

    def below_reversed(self, root: str, key: bytes) -> Iterator[tuple[bytes, str]]:
        """(key, type) of every entry below `key`, every entry after all of its descendants."""
        low, high = subtree_bounds(key)
        before = high
        root_id = self._root(root)
        while True:
            rows: list[tuple[bytes, str]] = self._db.execute(
                "SELECT key, type FROM files WHERE root = ? AND key >= ? AND key < ? ORDER BY key DESC LIMIT 1000",
                (root_id, low, before),
            ).fetchall()
            yield from rows
            if len(rows) < 1000:
                return
            before = rows[-1][0]

    def put(self, root: str, key: bytes, facts: Facts) -> None:
        self.put_many([(root, key, facts)])

    def put_many(self, rows: list[tuple[str, bytes, Facts]]) -> None:
        try:
            self._db.executemany(PUT_SQL, [(self._root(root, create=True), key, *_values(f)) for root, key, f in rows])
        except OverflowError:  # a value past 64 bits: again, those rows as BLOBs (a replace, so repeatable)
            wide = [(self._root(root, create=True), key, *_wide_values(f)) for root, key, f in rows]
            self._db.executemany(PUT_SQL, wide)

    def drop_tree(self, root: str, key: bytes) -> None:
        low, high = subtree_bounds(key)
        root_id = self._root(root)
        # Two statements, each a primary-key search: with `key = ? OR (range)` SQLite scans the whole root.
        self._db.execute("DELETE FROM files WHERE root = ? AND key = ?", (root_id, key))
        self._db.execute("DELETE FROM files WHERE root = ? AND key >= ? AND key < ?", (root_id, low, high))

    def move_tree(self, root: str, src: bytes, dst: bytes) -> None:
        """The entry at `src` and everything below it now live at `dst` (what was at `dst` is replaced)."""
        self.drop_tree(root, dst)
        low, high = subtree_bounds(src)
        root_id = self._root(root)
        self._db.execute("UPDATE files SET key = ? WHERE root = ? AND key = ?", (dst, root_id, src))
        self._db.execute(
            "UPDATE files SET key = CAST(? || substr(key, ?) AS BLOB) WHERE root = ? AND key >= ? AND key < ?",
            (dst, len(src) + 1, root_id, low, high),
        )

    def linked(self, dev: int, ino: int) -> list[tuple[str, bytes]]:
        """Every indexed name of an inode (an index search: `cp -al` of a big tree asks once per file)."""
        rows = self._db.execute(
            "SELECT roots.path, key FROM files JOIN roots ON roots.id = files.root WHERE dev = ? AND ino = ?",
            (_wide(dev), _wide(ino)),
        )
        return [(path, key) for path, key in rows]

    def replace_index(self, rows: Iterable[tuple[str, bytes, Facts]]) -> None:
        """The whole index from a rebuild (inside a transaction)."""
        self._db.execute("DELETE FROM files")
        self.put_many(list(rows))

    def count(self) -> int:
        found: int = self._db.execute("SELECT count(*) FROM files").fetchone()[0]
        return found
