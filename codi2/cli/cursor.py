"""`codi2 events --cursor-file F`: where a reader of the trail stopped, so the next run resumes exactly after
the last event it printed (docs/siem.md).

The cursor is the store's own read position (SQLite's `pos`, FoundationDB's packed key), kept as opaque
bytes, hex in the file. The file names what it belongs to, and is refused anywhere else: the tenant, the
store (backend and location) and the trail itself (the id of the tenant's first event, so a store deleted
and recreated at the same place, whose positions start over, is not read from the middle).

Crash safety: the caller flushes a line to stdout, then `save`s its cursor: temp file, fsync, rename, fsync
of the directory. A reader killed between the two prints that one line again when it restarts, and never
more than that one; consumers that dedupe on the event id make the stream exactly once. One reader at a
time: a second one on the same file stops at once (an advisory lock on `F.lock`, released by the kernel
however the first one ends).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from codi2.cli.common import UsageError
from codi2.config import Settings
from codi2.stores.base import Cursor, TrailReader
from codi2.trail.events import EventQuery, now_rfc3339

FORMAT = "codi2-cursor/1"


class CursorBusy(Exception):
    """Another reader holds the cursor file."""


def store_name(settings: Settings) -> str:
    """The configured store as a cursor file names it: backend and location."""
    if settings.backend == "sqlite":
        return f"sqlite:{settings.sqlite_file.resolve()}"
    from codi2.stores.fdb.client import parse_cluster_file, resolve_cluster_file

    desc, ident, _ = parse_cluster_file(resolve_cluster_file(settings).read_text())
    return f"fdb:{desc}:{ident}/{'/'.join(settings.foundationdb.root_prefix)}"


def encode(cursor: Cursor) -> dict[str, str]:
    """A cursor as the file holds it: its bytes in hex, and which of the store's two kinds it is."""
    if isinstance(cursor, bytes):
        return {"cursor": cursor.hex(), "cursor_type": "bytes"}
    return {"cursor": cursor.to_bytes(8, "big").hex(), "cursor_type": "int"}


def decode(data: dict[str, Any]) -> Cursor:
    raw = bytes.fromhex(data["cursor"])
    if data["cursor_type"] == "bytes":
        return raw
    if data["cursor_type"] == "int":
        return int.from_bytes(raw, "big")
    raise ValueError(f"unknown cursor_type {data['cursor_type']!r}")


class CursorFile:
    """One reader's cursor file, locked while it is open."""

    def __init__(self, path: Path, tenant_id: str, store: str, reader: TrailReader) -> None:
        self.path = path
        self.identity = {"format": FORMAT, "tenant_id": tenant_id, "store": store}
        self._reader = reader
        self.trail = self._first_id()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise CursorBusy(f"{path}: in use by another reader") from None
        self._dir = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._tmp = path.with_name(f".{path.name}.tmp")

    def _first_id(self) -> str | None:
        """The id of the tenant's first event: the trail's identity."""
        first = next(iter(self._reader.read(EventQuery(self.identity["tenant_id"], limit=1))), None)
        return first[1].id if first is not None else None

    def load(self) -> Cursor | None:
        """Where the last run stopped; None when there is no file yet (read from the start)."""
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise UsageError(f"{self.path}: not a cursor file (delete it to read from the start)")
        for key, value in self.identity.items():
            if data.get(key) != value:
                raise UsageError(f"{self.path}: written for {key} {data.get(key)!r}, not {value!r}")
        if data.get("trail") != self.trail:
            raise UsageError(
                f"{self.path}: written for the trail whose first event is {data.get('trail')!r}; this store's is"
                f" {self.trail!r} (the store was replaced: delete the file to read it from the start)"
            )
        try:
            return decode(data)
        except (KeyError, ValueError) as exc:
            raise UsageError(f"{self.path}: bad cursor: {exc}") from None

    def save(self, cursor: Cursor, event_id: str) -> None:
        """Record `cursor` (the position of event `event_id`, whose line is flushed) durably and atomically."""
        if self.trail is None:  # the trail was empty when this run began
            self.trail = self._first_id()
        data = {**self.identity, "trail": self.trail, **encode(cursor), "last_id": event_id, "written": now_rfc3339()}
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(data).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)
        os.fsync(self._dir)

    def close(self) -> None:
        os.close(self._dir)
        os.close(self._lock)
