"""The Python floors of the burst: the least durable work a Python program can do for the burst's files,
straight-line, with nothing watched and no event built. For each file: lstat, open, fstat, one read
(size + 1 bytes: a shorter answer is the end of the file, as codi2 reads), sha256, close, and then

- `plain` (issue #21's floor): one row in a table with no index, in WAL with synchronous=FULL;
- `trail`: the rows codi2's trail cannot do without, in codi2's own schema (the journal's and the SQLite
  store's migrations, run here): the file's index row (keyed by its path, with the inode index) and one
  event row with a 36-character time-ordered id, its batch, its session and a 200-byte body, under the
  store's indexes; synchronous=FULL, as codi2 writes by default.

One commit per 1,000 files in both. codi2's burst CPU is measured against them, so the target moves with the
machine and with the interpreter rather than with a C watcher; `trail` separates what the trail's durable rows
cost from what codi2 adds (watching, interpreting, building events).

    python bench/floor.py ROOT FILES DIRS DB [plain|trail]   -> one JSON line: {"files", "rows", "cpu_s", "wall_s"}

The files are named as the burst's writer names them (`ROOT/d{i % DIRS}/f{i}`), so no directory is
listed. CPU is this process's (every thread), from the database open to the last commit: codi2's is
counted from its readiness, after its imports and its own database open.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codi2.schema import Schema

COMMIT_EVERY = 1000
FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
BODY = bytes(200)  # about the size of one encoded event of the burst


def _schemas() -> list[Schema]:
    """codi2's own migrations (imported before the clock starts, as codi2's imports are)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from codi2.journal.journal import SCHEMA as JOURNAL
    from codi2.stores.sqlite import SCHEMA as STORE

    return [JOURNAL, STORE]


def _trail_schema(conn: sqlite3.Connection, schemas: list[Schema]) -> tuple[str, str]:
    """codi2's own tables: (index row insert, event row insert)."""
    conn.execute("BEGIN")
    for schema in schemas:
        schema.migrate(conn)
    conn.execute("INSERT INTO roots (id, path) VALUES (1, '/burst')")
    conn.execute("COMMIT")
    return (
        "INSERT OR REPLACE INTO files VALUES (1, ?, 'file', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
        "INSERT OR IGNORE INTO events (id, batch_id, tenant_id, ts, action, path, body, session_id)"
        " VALUES (?, ?, 'tenant', ?, 'created', ?, ?, 'session')",
    )


def main() -> int:
    root, files, dirs, db = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    trail = (sys.argv[5] if len(sys.argv) > 5 else "plain") == "trail"
    schemas = _schemas() if trail else []
    cpu0, wall0 = time.process_time(), time.monotonic()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if trail:
        index_row, event_row = _trail_schema(conn, schemas)
    else:
        conn.execute("CREATE TABLE files (path TEXT, size INTEGER, mode INTEGER, mtime_ns INTEGER, sha256 TEXT)")
    insert = "INSERT INTO files VALUES (?, ?, ?, ?, ?)"
    conn.execute("BEGIN")
    for i in range(files):
        path = os.path.join(root, f"d{i % dirs}", f"f{i}")
        os.lstat(path)
        fd = os.open(path, FLAGS)
        try:
            st = os.fstat(fd)
            digest = hashlib.sha256(os.read(fd, st.st_size + 1)).hexdigest()
        finally:
            os.close(fd)
        if trail:
            rel = f"d{i % dirs}/f{i}".encode()
            conn.execute(
                index_row,
                (rel.replace(b"/", b"\x00"), st.st_size, st.st_mode & 0o7777, st.st_mtime_ns, st.st_ctime_ns,
                 st.st_ino, st.st_dev, st.st_nlink, digest, st.st_uid, st.st_gid),
            )  # fmt: skip
            t = f"{time.time_ns():032x}"
            conn.execute(
                event_row,
                (f"{t[:8]}-{t[8:12]}-{t[12:16]}-{t[16:20]}-{t[20:]}", f"b{i // COMMIT_EVERY}", str(st.st_mtime_ns),
                 rel, BODY + rel),
            )  # fmt: skip
        else:
            conn.execute(insert, (path, st.st_size, st.st_mode, st.st_mtime_ns, digest))
        if (i + 1) % COMMIT_EVERY == 0:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
    conn.execute("COMMIT")
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    rows = conn.execute("SELECT count(*) FROM files").fetchone()[0]
    conn.close()
    print(json.dumps({"files": files, "rows": rows, "cpu_s": cpu, "wall_s": wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
