"""Edits of a store made behind its sink's back, as anyone with write access to it could make them: the
primitives `sink_contract.py` builds every tampering of the trail from, for each backend."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import fdb.tuple as fdbtuple
from fdb_v1_writer import v1_value

from codi2.stores.base import Cursor, StoredBatch
from codi2.stores.fdb.codec import Piece, decode_piece, encode_piece, encode_progress
from codi2.stores.fdb.sink import FdbSink
from codi2.trail.events import BatchHeader, Event, encode_event


class Tamper(Protocol):
    """What a backend offers `sink_contract.py` to tamper with its store."""

    def delete_event(self, tenant: str, cursor: Cursor) -> None: ...

    def put_event(self, tenant: str, cursor: Cursor, event: Event) -> None:
        """Overwrite the event stored at `cursor` (an event of another tenant moves to that tenant)."""

    def delete_header(self, tenant: str, stream: str, number: int) -> None: ...

    def put_header(self, tenant: str, header: BatchHeader, where: StoredBatch) -> None:
        """Store `header` at its number, its events being those `where` locates."""


class SqliteTamper:
    """SQL on the store's file, as anyone who can write it could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _run(self, sql: str, *args: Any) -> None:
        with closing(sqlite3.connect(self.path)) as db, db:
            db.execute(sql, args)

    def delete_event(self, tenant: str, cursor: Cursor) -> None:
        self._run("DELETE FROM events WHERE pos = ?", cursor)

    def put_event(self, tenant: str, cursor: Cursor, e: Event) -> None:
        self._run(
            "UPDATE events SET id = ?, tenant_id = ?, ts = ?, action = ?, path = ?, body = ? WHERE pos = ?",
            *(e.id, e.tenant_id, e.ts, e.action, os.fsencode(e.path), encode_event(e), cursor),
        )

    def delete_header(self, tenant: str, stream: str, number: int) -> None:
        self._run("DELETE FROM batches WHERE tenant_id = ? AND stream_id = ? AND number = ?", tenant, stream, number)

    def put_header(self, tenant: str, h: BatchHeader, where: StoredBatch) -> None:
        self._run(
            "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            *(tenant, h.stream_id, h.number, h.ts, h.prev, h.link, h.key_id, h.events, *where.where),
        )


class FdbTamper:
    """Keys set and cleared directly, as any client of the cluster could (docs/fdb-layout.md): layout v2's
    pieces decoded, edited and written back; v1's keys (a store written by codi2 0.2) edited as they are."""

    def __init__(self, db: Any, root: tuple[str, ...] = ("codi2",)) -> None:
        self.db = db
        self.keys = FdbSink(db, tenant_id=None, root=root)
        self.removed: dict[bytes, list[int]] = {}  # per piece key: indexes deleted, as batch_events gave them

    def _v1(self, tenant: str, cursor: bytes) -> bool:
        return cursor.startswith(self.keys.key(tenant, "audit"))

    def _piece(self, cursor: bytes) -> tuple[bytes, int, Piece]:
        """The piece a cursor points into and the event's index in it now (earlier deletions shift it)."""
        tenant, _, vs, p, index = fdbtuple.unpack(cursor, prefix_len=len(self.keys.key()))
        key = self.keys.key(tenant, "log", vs, p)
        index -= sum(1 for i in self.removed.get(key, []) if i < index)
        return key, index, decode_piece(self.db.get(key))

    def _put_piece(self, key: bytes, piece: Piece, events: list[Event]) -> None:
        self.db.set(key, encode_piece(piece.stream_id, piece.number, piece.first, events))

    def delete_event(self, tenant: str, cursor: Cursor) -> None:
        assert isinstance(cursor, bytes)
        if self._v1(tenant, cursor):
            self.db.clear(cursor)
            return
        key, index, piece = self._piece(cursor)
        self.removed.setdefault(key, []).append(fdbtuple.unpack(cursor, prefix_len=len(self.keys.key()))[-1])
        self._put_piece(key, piece, piece.events[:index] + piece.events[index + 1 :])

    def put_event(self, tenant: str, cursor: Cursor, event: Event) -> None:
        assert isinstance(cursor, bytes)
        if self._v1(tenant, cursor):
            *_, vs, n = fdbtuple.unpack(cursor, prefix_len=len(self.keys.key()))
            self.db.clear(cursor)
            self.db.set(self.keys.key(event.tenant_id, "audit", vs, n), v1_value(event))
            return
        key, index, piece = self._piece(cursor)
        if event.tenant_id == tenant:
            self._put_piece(key, piece, [*piece.events[:index], event, *piece.events[index + 1 :]])
            return
        self.delete_event(tenant, cursor)  # moved to the other tenant's log
        _, _, vs, p = fdbtuple.unpack(key, prefix_len=len(self.keys.key()))
        self.db.set(self.keys.key(event.tenant_id, "log", vs, p), encode_piece(None, None, 0, [event]))

    def delete_header(self, tenant: str, stream: str, number: int) -> None:
        self.db.clear(self.keys.key(tenant, "c", stream, number))
        self.db.clear(self.keys.key(tenant, "chain", stream, number))

    def put_header(self, tenant: str, h: BatchHeader, where: StoredBatch) -> None:
        layout, runs = where.where
        if layout == "v1":
            own = fdbtuple.Versionstamp(bytes(10))  # every run below names its commit version
            value = fdbtuple.pack((1, own, h.ts, h.prev, h.link, h.key_id, h.events, runs))
            self.db.set(self.keys.key(tenant, "chain", h.stream_id, h.number), value)
            return
        progress = encode_progress(h, h.events, runs)[:-4]  # set plainly: every run names its commit version
        self.db.set(self.keys.key(tenant, "c", h.stream_id, h.number), progress)
