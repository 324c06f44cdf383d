"""The durable spool between batcher and sink.

Append-only segment files under `<state dir>/spool/`, one record per batch:

    u32 length | u32 crc32(payload) | payload (JSON: the batch's events and their index facts)

A batch is appended and fsynced before it counts as observed; the shipper commits batches in order and
acknowledges them; the acknowledged position is persisted (lazily: a replay of a batch the store already
holds changes nothing, since every event has an id) and wholly acknowledged segments are deleted.

A batch's id is its position: `<segment>-<offset>`, where a segment is named by a UUIDv7 taken when it
was created. So a batch replayed after a crash carries the same id, and ids sort by time, which lets the
FoundationDB sink prune old batch markers by key range.

Recovery reads every record after the acknowledged position; a torn or corrupt record (bad length or
checksum, as a crash mid-write leaves at the tail) is counted, the segment is cut there, and the daemon
starts with everything before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import structlog

from codi2.events import EVENT_KEYS, Batch, Event, uuid7, uuid7_ms

log = structlog.get_logger("codi2.spool")

HEADER = struct.Struct("<II")
ACK_FILE = "ack"
SEGMENT_SUFFIX = ".seg"
ACK_PERSIST_S = 1.0

Facts = tuple[int | None, int | None]  # (inode, mtime_ns) for the file-state index


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """A batch as the spool holds it: its position, its events and the facts the index needs."""

    segment: str
    offset: int
    end: int
    batch: Batch
    facts: tuple[Facts, ...]
    size: int


def encode_record(events: list[Event], facts: list[Facts]) -> bytes:
    payload = json.dumps(
        {"e": [[getattr(e, k) for k in EVENT_KEYS] for e in events], "f": facts}, separators=(",", ":")
    ).encode("ascii")
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> tuple[list[Event], list[Facts]]:
    data = json.loads(payload)
    events = [Event(**dict(zip(EVENT_KEYS, row, strict=True))) for row in data["e"]]
    return events, [tuple(f) for f in data["f"]]  # type: ignore[misc]


class SpoolFullError(OSError):
    """The spool's disk is full: the batch could not be made durable."""


class DiskSpool:
    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int, fsync: bool = True) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._pending: deque[SpooledBatch] = deque()
        self._bytes = 0
        self._events = 0
        self._changed = asyncio.Condition()
        self._closed = False
        self._fd: int | None = None
        self._segment: str | None = None
        self._segment_size = 0
        self._ack: tuple[str, int] | None = None
        self._ack_persisted_at = 0.0
        self._ack_dirty = False
        self._pruned_before: str | None = None
        self.corrupt_records = 0

    # Figures -------------------------------------------------------------------------------------

    @property
    def pending_events(self) -> int:
        return self._events

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    # Recovery ------------------------------------------------------------------------------------

    def recover(self) -> list[SpooledBatch]:
        """Load every batch after the acknowledged position; returns them (also queued for shipping)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ack = self._read_ack()
        segments = sorted(p.name for p in self.directory.glob(f"*{SEGMENT_SUFFIX}"))
        for name in segments:
            start = 0
            if ack is not None:
                if name < ack[0]:
                    (self.directory / name).unlink(missing_ok=True)  # wholly acknowledged
                    continue
                if name == ack[0]:
                    start = ack[1]
            for item in self._read_segment(name, start):
                self._pending.append(item)
                self._bytes += item.size
                self._events += len(item.batch.events)
        self._ack = ack
        if self.corrupt_records:
            log.error("spool_corrupt_records", count=self.corrupt_records, directory=str(self.directory))
        return list(self._pending)

    def _read_ack(self) -> tuple[str, int] | None:
        try:
            name, offset = (self.directory / ACK_FILE).read_text().split()
            return name, int(offset)
        except (OSError, ValueError):
            return None

    def _read_segment(self, name: str, start: int) -> list[SpooledBatch]:
        path = self.directory / name
        data = path.read_bytes()
        out = []
        offset = start
        while offset < len(data):
            if offset + HEADER.size > len(data):
                self._cut(path, offset, "torn header")
                break
            length, crc = HEADER.unpack_from(data, offset)
            body = data[offset + HEADER.size : offset + HEADER.size + length]
            end = offset + HEADER.size + length
            if len(body) < length or zlib.crc32(body) != crc:
                self._cut(path, offset, "torn or corrupt record")
                break
            try:
                events, facts = decode_payload(body)
            except (ValueError, TypeError, KeyError):
                self.corrupt_records += 1
                log.error("spool_record_undecodable", segment=name, offset=offset)
                offset = end
                continue
            batch = Batch(self._batch_id(name, offset), tuple(events))
            out.append(SpooledBatch(name, offset, end, batch, tuple(facts), end - offset))
            offset = end
        return out

    def _cut(self, path: Path, offset: int, why: str) -> None:
        """Everything from `offset` on is a write the crash interrupted: count it and cut it off."""
        self.corrupt_records += 1
        log.error("spool_tail_cut", segment=path.name, offset=offset, reason=why)
        with open(path, "r+b") as f:
            f.truncate(offset)
            os.fsync(f.fileno())

    @staticmethod
    def _batch_id(segment: str, offset: int) -> str:
        return f"{segment.removesuffix(SEGMENT_SUFFIX)}-{offset:012d}"

    # Appending (worker thread) -------------------------------------------------------------------

    def append(self, events: list[Event], facts: list[Facts]) -> SpooledBatch:
        """Write and fsync one batch; blocking, so the pipeline calls it from its worker thread."""
        record = encode_record(events, facts)
        if self._fd is None or self._segment_size + len(record) > self._segment_bytes:
            self._roll()
        assert self._fd is not None and self._segment is not None
        offset = self._segment_size
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(28, "short write to spool")
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._abandon_segment(offset)
            raise SpoolFullError(exc.errno, f"spool write failed: {exc.strerror}") from exc
        self._segment_size += len(record)
        batch = Batch(self._batch_id(self._segment, offset), tuple(events))
        return SpooledBatch(self._segment, offset, self._segment_size, batch, tuple(facts), len(record))

    def _roll(self) -> None:
        """Open a new segment named by a UUIDv7 strictly later than every earlier one, so names sort in
        creation order (recovery relies on it) even when two segments start in one millisecond."""
        if self._fd is not None:
            os.close(self._fd)
        names = [p.name for p in self.directory.glob(f"*{SEGMENT_SUFFIX}")]
        last_ms = max((uuid7_ms(n.removesuffix(SEGMENT_SUFFIX)) for n in names), default=0)
        self._segment = f"{uuid7(max(time.time_ns() // 1_000_000, last_ms + 1))}{SEGMENT_SUFFIX}"
        path = self.directory / self._segment
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._segment_size = 0
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name itself survives a crash
        finally:
            os.close(dir_fd)

    def _abandon_segment(self, good_size: int) -> None:
        """After a failed write, start a fresh segment next time; cut the partial record off this one."""
        if self._fd is not None:
            with contextlib.suppress(OSError):  # if this fails too, recovery cuts the torn tail
                os.ftruncate(self._fd, good_size)
            os.close(self._fd)
        self._fd = None

    # Queue (event loop) --------------------------------------------------------------------------

    async def wait_for_room(self, size: int) -> None:
        """Back-pressure: block the batcher (and so the watcher) while the spool is full."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._bytes + size <= self.max_bytes or not self._pending)

    async def publish(self, item: SpooledBatch) -> None:
        async with self._changed:
            self._pending.append(item)
            self._bytes += item.size
            self._events += len(item.batch.events)
            self._changed.notify_all()

    async def peek(self) -> SpooledBatch | None:
        """The oldest unacknowledged batch; None once closed and empty."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._pending or self._closed)
            return self._pending[0] if self._pending else None

    async def ack(self, item: SpooledBatch) -> None:
        async with self._changed:
            if self._pending and self._pending[0] is item:
                self._pending.popleft()
                self._bytes -= item.size
                self._events -= len(item.batch.events)
            self._ack = (item.segment, item.end)
            self._ack_dirty = True
            self._changed.notify_all()
        if time.monotonic() - self._ack_persisted_at >= ACK_PERSIST_S:
            await asyncio.to_thread(self.persist_ack)

    def persist_ack(self) -> None:
        """Write the acknowledged position (tmp, fsync, rename) and delete wholly acknowledged segments."""
        if not self._ack_dirty or self._ack is None:
            return
        segment, offset = self._ack
        self._ack_dirty = False
        self._ack_persisted_at = time.monotonic()
        tmp = self.directory / (ACK_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{segment} {offset}\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.directory / ACK_FILE)
        if segment != self._pruned_before:  # segments only become wholly acknowledged when it moves on
            self._pruned_before = segment
            for path in self.directory.glob(f"*{SEGMENT_SUFFIX}"):
                if path.name < segment:
                    path.unlink(missing_ok=True)

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    def shutdown(self) -> None:
        """Persist the acknowledged position and close the open segment."""
        self.persist_ack()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
