"""State written by releases before the journal (0.1): spool segments and `index.db`, carried into the
journal once at start-up so that an upgrade never drops a backlog built up during an outage.

The old spool: `<state>/spool/<uuid7>.seg` files of records `u32 length | u32 crc32 | JSON payload`
(`{"e": [[event fields in LEGACY_KEYS order]], "f": [...]}`), and an `ack` file naming the segment and
offset the store had committed. The old index: `<state>/index.db`, table `files(root, path, type, size,
mtime_ns, inode, sha256)` and `meta(spool_position)`, the spool position it reflected.

A record that fails its checksum is skipped and the reader looks for the next record that checks out,
so one flipped byte costs one batch, not the rest of the segment. If a lost record lies before the
position the old index had applied, the index is ahead of the trail and must be rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import structlog

from codi2.disk.fs import Facts, key_of
from codi2.journal.journal import Journal
from codi2.trail.events import Event

log = structlog.get_logger("codi2.journal.legacy")

LEGACY_KEYS = (
    "id",
    "seq",
    "ts",
    "tenant_id",
    "user_id",
    "session_id",
    "pod",
    "action",
    "path",
    "dest_path",
    "root",
    "type",
    "size",
    "mode",
    "mtime",
    "sha256",
    "origin",
)
HEADER = struct.Struct("<II")


@dataclass
class Migrated:
    batches: int
    events: int
    corrupt_records: int
    index_rows: int
    index_readable: bool
    needs_rebuild: bool


def present(state_dir: Path) -> bool:
    return (state_dir / "spool").is_dir() or (state_dir / "index.db").exists()


def migrate(state_dir: Path, journal: Journal, *, remove: bool = True) -> Migrated:
    """Copy the old backlog and index into `journal` in one transaction, then (with `remove`) remove the
    old files."""
    position, rows, readable = _read_index(state_dir / "index.db")
    batches, corrupt_before, corrupt = _read_spool(state_dir / "spool", position)
    needs_rebuild = not readable or corrupt_before > 0
    with journal.transaction():
        for batch_id, events in batches:
            journal.append(events, batch_id)
        journal.put_many(rows)
        if rows or position is not None:
            journal.mark_initialized()
        if needs_rebuild:
            journal.set_needs_rebuild(True)
    if remove:
        for name in ("spool", "barrier"):
            shutil.rmtree(state_dir / name, ignore_errors=True)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (state_dir / f"index.db{suffix}").unlink()
    result = Migrated(len(batches), sum(len(e) for _, e in batches), corrupt, len(rows), readable, needs_rebuild)
    log.info("legacy_state_migrated", **vars(result))
    return result


def _read_index(path: Path) -> tuple[tuple[str, int] | None, list[tuple[str, bytes, Facts]], bool]:
    """(spool position applied, rows, readable). An unreadable index is reported, never fatal."""
    if not path.exists():
        return None, [], True
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None, [], False
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        rows = [
            (root, key_of(p), Facts(kind, size, None, mtime_ns, None, inode, None, None, sha))
            for root, p, kind, size, mtime_ns, inode, sha in db.execute(
                "SELECT root, path, type, size, mtime_ns, inode, sha256 FROM files"
            )
        ]
    except sqlite3.Error as exc:
        log.error("legacy_index_unreadable", path=str(path), error=str(exc))
        return None, [], False
    finally:
        db.close()
    position = None
    if "spool_position" in meta:
        segment, offset = meta["spool_position"].split()
        position = (segment, int(offset))
    return position, rows, True


def _read_spool(directory: Path, applied: tuple[str, int] | None) -> tuple[list[tuple[str, list[Event]]], int, int]:
    """(batches after the ack, corrupt records before the index's position, corrupt records in all)."""
    if not directory.is_dir():
        return [], 0, 0
    try:
        segment, acked = (directory / "ack").read_text().split()
        ack: tuple[str, int] | None = (segment, int(acked))
    except (OSError, ValueError):
        ack = None
    batches: list[tuple[str, list[Event]]] = []
    corrupt_before = corrupt = 0
    for path in sorted(directory.glob("*.seg")):
        start = 0
        if ack is not None:
            if path.name < ack[0]:
                continue
            if path.name == ack[0]:
                start = ack[1]
        data = path.read_bytes()
        offset = start
        while offset + HEADER.size <= len(data):
            record = _record_at(data, offset)
            if record is None:
                nxt = _next_record(data, offset + 1)
                if nxt is None:
                    if applied is not None and (path.name, offset) < applied:
                        corrupt_before += 1
                    corrupt += 1
                    break  # a torn tail: the write a crash interrupted
                corrupt += 1
                if applied is None or (path.name, offset) < applied:
                    corrupt_before += 1
                log.error("legacy_spool_record_corrupt", segment=path.name, offset=offset)
                offset = nxt
                continue
            events, end = record
            stem = path.name.removesuffix(".seg")
            batches.append((f"{stem}-{offset:012d}", events))
            offset = end
    return batches, corrupt_before, corrupt


def _record_at(data: bytes, offset: int) -> tuple[list[Event], int] | None:
    length, crc = HEADER.unpack_from(data, offset)
    end = offset + HEADER.size + length
    if end > len(data) or length == 0:
        return None
    body = data[offset + HEADER.size : end]
    if zlib.crc32(body) != crc:
        return None
    try:
        rows = json.loads(body)["e"]
        events = [Event.from_fields(dict(zip(LEGACY_KEYS, row, strict=False))) for row in rows]
    except (ValueError, KeyError, TypeError):
        return None
    return events, end


def _next_record(data: bytes, start: int) -> int | None:
    """The next offset where a whole record checks out: resynchronisation after a damaged one."""
    for offset in range(start, len(data) - HEADER.size + 1):
        length, _ = HEADER.unpack_from(data, offset)
        if 0 < length <= len(data) - offset - HEADER.size and _record_at(data, offset) is not None:
            return offset
    return None
