"""The Python floor of the burst: the least durable work a Python program can do for the burst's files,
straight-line, with nothing watched and no event built. For each file: lstat, open, fstat, one read
(size + 1 bytes: a shorter answer is the end of the file, as codi2 reads), sha256, close, one SQLite row,
in WAL with synchronous=FULL and one commit per 1,000 files. codi2's burst CPU is measured against it, so
the target moves with the machine and with the interpreter rather than with a C watcher.

    python bench/floor.py ROOT FILES DIRS DB   -> one JSON line: {"files", "rows", "cpu_s", "wall_s"}

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

COMMIT_EVERY = 1000
FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def main() -> int:
    root, files, dirs, db = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cpu0, wall0 = time.process_time(), time.monotonic()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
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
