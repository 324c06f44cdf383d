"""Edits of a store made behind its sink's back, as anyone with write access to it could make them: the
primitives `sink_contract.py` builds every tampering of the trail from, for each backend."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import fdb.tuple as fdbtuple

from codi2.stores.base import Cursor, StoredBatch
from codi2.stores.fdb.codec import encode_event as fdb_value
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
    """Keys set and cleared directly, as any client of the cluster could (docs/fdb-layout.md)."""

    def __init__(self, db: Any, root: tuple[str, ...] = ("codi2",)) -> None:
        self.db = db
        self.keys = FdbSink(db, tenant_id=None, root=root)

    def delete_event(self, tenant: str, cursor: Cursor) -> None:
        self.db.clear(cursor)

    def put_event(self, tenant: str, cursor: Cursor, event: Event) -> None:
        assert isinstance(cursor, bytes)
        *_, vs, n = fdbtuple.unpack(cursor, prefix_len=len(self.keys.key()))
        self.db.clear(cursor)
        self.db.set(self.keys.key(event.tenant_id, "audit", vs, n), fdb_value(event))

    def delete_header(self, tenant: str, stream: str, number: int) -> None:
        self.db.clear(self.keys.key(tenant, "chain", stream, number))

    def put_header(self, tenant: str, h: BatchHeader, where: StoredBatch) -> None:
        own = fdbtuple.Versionstamp(bytes(10))  # every run below names its commit version
        value = fdbtuple.pack((1, own, h.ts, h.prev, h.link, h.key_id, h.events, where.where))
        self.db.set(self.keys.key(tenant, "chain", h.stream_id, h.number), value)
