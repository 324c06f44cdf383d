"""The audit event: what every sink stores and `codi2 events` prints. Imports nothing of codi2.

Paths are `str` decoded with the filesystem encoding and `surrogateescape`, so a non-UTF-8 name
round-trips losslessly: `os.fsencode(event.path)` gives back the exact bytes. In JSON such a name
appears as `\\udcXX` escapes, which Python's `json` reads back unchanged.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec

Action = Literal["created", "updated", "deleted", "moved", "gap", "start", "stop"]
ACTIONS: tuple[Action, ...] = ("created", "updated", "deleted", "moved", "gap", "start", "stop")
# The daemon's own life, not a change of the workspace: `dest_path` holds their details as a JSON object.
LIFECYCLE: tuple[Action, ...] = ("start", "stop")
EntryType = Literal["file", "dir", "symlink"]
Origin = Literal["live", "rescan", "offline", "baseline"]
C = TypeVar("C")  # a sink's read cursor


# Ids need to be unique, not secret: a generator seeded from the kernel once per process draws the
# random bits without a system call per event.
_random = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))
_VERSION_VARIANT = (0x7 << 76) | (0x2 << 62)
_RANDOM_MASK = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)


def uuid7(ms: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): millisecond time prefix (now, or `ms`), so ids sort by creation time."""
    ms = time.time_ns() // 1_000_000 if ms is None else ms
    text = (ms << 80 | (_random.getrandbits(80) & _RANDOM_MASK) | _VERSION_VARIANT).to_bytes(16).hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def uuid7_ms(value: str) -> int:
    """The millisecond timestamp of a UUIDv7."""
    return int(value.replace("-", "")[:12], 16)


def rfc3339(epoch_seconds: float) -> str:
    """RFC 3339 UTC with microseconds, the one timestamp format of the trail."""
    return rfc3339_ns(round(epoch_seconds * 1e6) * 1000)


_last_now: tuple[int, str] = (-1, "")


def now_rfc3339() -> str:
    """The time now, as `rfc3339`, formatted once per millisecond (a burst stamps thousands of events)."""
    global _last_now
    now = time.time_ns()
    ms = now // 1_000_000
    if _last_now[0] != ms:
        _last_now = (ms, rfc3339_ns(now))
    return _last_now[1]


_last_second: tuple[int, str] = (-1, "")


def rfc3339_ns(epoch_ns: int) -> str:
    """`rfc3339` from integer nanoseconds (st_mtime_ns), without float rounding. On the hot path, and a
    burst's timestamps share their second, so the formatted second is reused."""
    global _last_second
    seconds, rest = divmod(epoch_ns, 1_000_000_000)
    cached_second, text = _last_second
    if cached_second != seconds:
        if _YEAR_1 <= seconds < _YEAR_10000:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        else:
            text = _expanded(seconds)
        _last_second = (seconds, text)
    return f"{text}.{rest // 1000:06d}Z"


_YEAR_1 = -62_135_596_800  # 0001-01-01T00:00:00Z
_YEAR_10000 = 253_402_300_800  # 10000-01-01T00:00:00Z


def _expanded(seconds: int) -> str:
    """A time outside years 1-9999, which a file's mtime can be (`touch -d 2300-01-01` is inside; tmpfs and
    XFS take far more): ISO 8601's expanded form, a sign and at least five year digits, from integer
    arithmetic (time.gmtime overflows; the proleptic Gregorian days-to-civil algorithm does not)."""
    days, rest = divmod(seconds, 86_400)
    days += 719_468  # from 1970-01-01 to 0000-03-01
    era, day_of_era = divmod(days, 146_097)
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    mp = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = year_of_era + era * 400 + (month <= 2)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    return f"{'-' if year < 0 else '+'}{abs(year):05d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 time; a naive one is taken as UTC."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who every event of a daemon belongs to."""

    tenant_id: str
    user_id: str
    session_id: str | None
    pod: str


class Event(NamedTuple):
    """One audit record. Field order is the order of keys in `codi2 events` JSON lines. A named tuple:
    immutable, and built four times faster than a frozen dataclass, which counts on a burst."""

    id: str
    seq: int
    ts: str
    tenant_id: str
    user_id: str
    session_id: str | None
    pod: str
    action: Action
    path: str
    dest_path: str | None
    root: str
    type: EntryType
    size: int | None
    mode: int | None
    mtime: str | None
    sha256: str | None
    origin: Origin = "live"
    uid: int | None = None  # the owner, as numbers: a sidecar cannot resolve names
    gid: int | None = None
    target: str | None = None  # a symlink's target (readlink), a path like `path`

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(EVENT_KEYS, self, strict=True))

    def to_json(self) -> str:
        """Compact JSON, ASCII only, so non-UTF-8 names survive as surrogate escapes."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        return cls.from_fields(json.loads(text))

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Event:
        """From a mapping written by this or another release: unknown keys are dropped, and an optional
        field it lacks is None (a record is never lost because the event gained a field)."""
        known = {k: v for k, v in data.items() if k in _FIELDS}
        for name in _OPTIONAL:
            known.setdefault(name, None)
        return cls(**known)


EVENT_KEYS: tuple[str, ...] = Event._fields
_FIELDS = frozenset(EVENT_KEYS)
_OPTIONAL = ("session_id", "dest_path", "size", "mode", "mtime", "sha256", "uid", "gid", "target")

# The compact record: one per event, the same bytes in the journal and in the SQLite store. A msgpack
# array whose first element is its version; each version's fields are these, in this order, with the
# paths as their raw bytes (a name that is not UTF-8 survives exactly). A later version adds fields at
# the end, so every release can read every earlier record. An event is written in the shortest version
# that holds it (version 1 when it has no owner and no target), so decoding and encoding a stored record
# gives back its exact bytes: what its batch's link covers, whichever release wrote it.
RECORD_V1 = EVENT_KEYS[: EVENT_KEYS.index("uid")]
RECORD_V2 = EVENT_KEYS
RECORD_FIELDS = {1: RECORD_V1, 2: RECORD_V2}
_PATHS = tuple(EVENT_KEYS.index(k) for k in ("path", "dest_path", "root", "target"))
_V2_ONLY = len(RECORD_V1)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def event_record(e: Event) -> list[Any]:
    if e.uid is None and e.gid is None and e.target is None:
        record: list[Any] = [1, *e[:_V2_ONLY]]
    else:
        record = [2, *e]
    for i in _PATHS:
        if i < len(record) - 1 and record[i + 1] is not None:
            record[i + 1] = os.fsencode(record[i + 1])
    return record


def encode_event(e: Event) -> bytes:
    return _encoder.encode(event_record(e))


def encode_events(events: Iterable[Event]) -> bytes:
    return _encoder.encode([event_record(e) for e in events])


def _from_record(row: list[Any]) -> Event:
    fields = RECORD_FIELDS.get(row[0]) if row and isinstance(row[0], int) else None
    if fields is None:
        raise ValueError(f"unknown event record version {row[0] if row else None!r}")
    values = row[1 : 1 + len(fields)]
    for i in _PATHS:
        if i < len(values) and isinstance(values[i], bytes):
            values[i] = os.fsdecode(values[i])
    return Event(*values)


def decode_event(body: bytes) -> Event:
    return _from_record(_decoder.decode(body))


def decode_events(body: bytes) -> list[Event]:
    return [_from_record(row) for row in _decoder.decode(body)]


@dataclass(slots=True, frozen=True)
class BatchHeader:
    """A batch's place in its stream's hash chain (`codi2.trail.chain` makes it; docs/trail-format.md). A stream is
    one journal's sequence of batches; `link` commits to `prev` (the link of batch `number - 1`), this
    header and the batch's events, so a store that loses, alters, reorders or gains anything shows it."""

    stream_id: str
    number: int  # 1, 2, … in the stream
    ts: str  # when the batch was journaled (RFC 3339), at or after every event's ts
    prev: bytes  # 32 bytes; zeros for batch 1
    link: bytes  # 32 bytes: SHA-256, or HMAC-SHA256 with the key `key_id` names
    key_id: str | None
    events: int


@dataclass(slots=True, frozen=True)
class Batch:
    """Events committed together. `batch_id` is the identity a sink uses to make re-writes idempotent;
    `header`, when set, is stored with the batch so the chain can be verified from the store."""

    batch_id: str
    events: tuple[Event, ...]
    header: BatchHeader | None = None


@dataclass(slots=True, frozen=True)
class EventQuery:
    """What `codi2 events` asks a sink for; every sink applies it with `select` for the same semantics."""

    tenant_id: str
    path_glob: str | None = None
    action: Action | None = None
    since: datetime | None = None
    limit: int | None = None
    until: datetime | None = None  # at or before: a filter (a batch delayed by an outage commits late)
    session_id: str | None = None

    def matches(self, event: Event) -> bool:
        if event.tenant_id != self.tenant_id:
            return False
        if self.action is not None and event.action != self.action:
            return False
        if self.session_id is not None and event.session_id != self.session_id:
            return False
        if self.since is not None and parse_time(event.ts) < self.since:
            return False
        if self.until is not None and parse_time(event.ts) > self.until:
            return False
        if self.path_glob is not None:
            paths = (event.path,) if event.dest_path is None else (event.path, event.dest_path)
            return any(fnmatch.fnmatchcase(p, self.path_glob) for p in paths)
        return True

    def select(self, rows: Iterable[tuple[C, Event]]) -> Iterator[tuple[C, Event]]:
        """The rows this query wants, in their order, at most `limit`: with 0, `rows` is never started."""
        if self.limit == 0:
            return
        count = 0
        for row in rows:
            if self.matches(row[1]):
                yield row
                count += 1
                if count == self.limit:
                    return
