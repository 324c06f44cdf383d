"""The outbox: batches journaled but not yet acknowledged by the store, in commit order.

Split as a disk buffer is (Vector's disk_v2: record, writer, reader, ledger):
- the **record**: a row's `body` holds the events' compact records (`codi2.trail.chain.records` of
  `codi2.trail.events.encode_event`), each versioned so any later release reads it; `header` the batch's place
  in the hash chain (`codi2.trail.chain.encode_header`); `crc` a CRC32 over both. `decode` checks a row.
- the **writer** (`insert`, `delete_through`): the journal thread's, inside its transactions.
- the **reader** (`OutboxReader`): the shipper's, on a read-only connection. It never writes: what the store
  took goes back to the journal thread as an acknowledgement (a batch number), as Filebeat's registrar
  takes acked states, and the journal thread deletes the rows.
- the **ledger**: the counts of the rows, the chain's head and the next event number, kept by the journal
  thread beside the rows it alone changes, so the counts cannot drift from the rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import msgspec

from codi2.schema import BUSY_TIMEOUT_S
from codi2.trail import chain
from codi2.trail.chain import ChainHead
from codi2.trail.events import BatchHeader, Event, decode_events

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    n        INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    events   INTEGER NOT NULL,
    crc      INTEGER NOT NULL,
    body     BLOB NOT NULL,
    header   BLOB
);
"""
COLUMNS = "n, batch_id, crc, body, header"


@dataclass(frozen=True, slots=True)
class OutboxBatch:
    n: int
    batch_id: str
    events: tuple[Event, ...]
    size: int
    header: BatchHeader | None  # None only in a row journaled before batches were chained


class BadRecord(ValueError):
    """A row that no longer checks out; its message says how."""


# Record --------------------------------------------------------------------------------------------


def crc(body: bytes, header: bytes | None) -> int:
    return zlib.crc32(header or b"", zlib.crc32(body))


def decode(n: int, batch_id: str, stored_crc: int, body: bytes, header: bytes | None) -> OutboxBatch:
    """A row as a batch, or BadRecord when its checksum or its contents are wrong."""
    if crc(body, header) != stored_crc:
        raise BadRecord("checksum mismatch")
    try:
        events = tuple(decode_events(body))
        sealed = chain.decode_header(header) if header is not None else None
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise BadRecord(f"undecodable: {exc}") from exc
    return OutboxBatch(n, batch_id, events, len(body), sealed)


# Writer (the journal thread) -------------------------------------------------------------------------


def insert(db: sqlite3.Connection, batch_id: str, events: int, body: bytes, header: bytes) -> int:
    cursor = db.execute(
        "INSERT INTO outbox (batch_id, events, crc, body, header) VALUES (?, ?, ?, ?, ?)",
        (batch_id, events, crc(body, header), body, header),
    )
    return cursor.lastrowid or 0


def delete_through(db: sqlite3.Connection, n: int) -> tuple[int, int, int]:
    """Delete every row up to batch `n`; returns how many (batches, events, bytes) went."""
    gone: tuple[int, int, int] = db.execute(
        "SELECT count(*), coalesce(sum(events), 0), coalesce(sum(length(body)), 0) FROM outbox WHERE n <= ?", (n,)
    ).fetchone()
    db.execute("DELETE FROM outbox WHERE n <= ?", (n,))
    return gone


# Ledger (the journal thread) -------------------------------------------------------------------------


@dataclass(slots=True)
class Ledger:
    """What the owner keeps beside the rows: their counts, the stream's chain head and the next event number."""

    batches: int
    events: int
    bytes: int
    next_seq: int
    chain: ChainHead

    @classmethod
    def read(cls, db: sqlite3.Connection, next_seq: int, head: ChainHead) -> Ledger:
        batches, events, size = db.execute(
            "SELECT count(*), coalesce(sum(events), 0), coalesce(sum(length(body)), 0) FROM outbox"
        ).fetchone()
        return cls(batches, events, size, next_seq, head)

    def copy(self) -> Ledger:
        return dataclasses.replace(self)

    def added(self, events: int, size: int) -> None:
        self.batches += 1
        self.events += events
        self.bytes += size

    def removed(self, gone: tuple[int, int, int]) -> None:
        self.batches -= gone[0]
        self.events -= gone[1]
        self.bytes -= gone[2]


# Reader (the shipper) --------------------------------------------------------------------------------


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write the file: opened read-only (`mode=ro`), and `query_only` besides."""
    db = sqlite3.connect(
        f"file:{quote(str(path))}?mode=ro",
        uri=True,
        timeout=BUSY_TIMEOUT_S,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        db.execute("PRAGMA query_only = ON")
    except sqlite3.Error:
        db.close()
        raise
    return db


class OutboxReader:
    """The shipper's view of the outbox: its own read-only connection, so reading never waits for a flush
    and never takes the write lock."""

    def __init__(self, path: Path) -> None:
        self._db = connect_readonly(path)

    def next_batches(self, after: int, limit: int) -> list[OutboxBatch | tuple[int, str]]:
        """The next batches after `after`; a row whose checksum or body is bad comes back as (n, reason)."""
        out: list[OutboxBatch | tuple[int, str]] = []
        rows = self._db.execute(
            f"SELECT {COLUMNS} FROM outbox WHERE n > ? ORDER BY n LIMIT ?", (after, limit)
        ).fetchall()
        for n, batch_id, stored_crc, body, header in rows:
            try:
                out.append(decode(n, batch_id, stored_crc, body, header))
            except BadRecord as exc:
                out.append((n, str(exc)))
        return out

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
