"""The FoundationDB key layout and value codec, in one place (docs/fdb-layout.md).

Pure: functions of their arguments over `fdb.tuple`, msgpack and zlib, no transaction and no cluster, so
a layout change is tested here first. (The bindings pack a versionstamp only once an API version is
selected, which loads libfdb_c; everything else here runs without it.) Every key is a tuple under the root
prefix (`[foundationdb] root_prefix`, tuple-packed), then the tenant, then a namespace.

Layout v2, what this release writes:

    key                                    value
    (tenant, "log", vs, p)                 a piece: msgpack [2, stream, number, first, zlib(records)]
    (tenant, "log", vs, p, i)              part i (1, 2, …) of a piece value over VALUE_MAX
    (tenant, "c", stream, number)          vs ‖ msgpack [1, done, ts, prev, link, key_id, events, runs]
    (tenant, "t", epoch_second)            vs of the latest transaction committed in that second
    (tenant, "s", session, vs)             empty: the transaction vs wrote events of that session
    (tenant, "streams", stream)            msgpack [user_id, pod, first_ts, predecessor]
    (tenant, "ids", event_id)              empty: an event of a batch without a header was written
    (tenant, "h", stream)                  msgpack [number, link, ts]: the stream's horizon (`codi2 prune`)
    (tenant, "probe", uuid)                a random token, written and cleared by `codi2 test`

Layout v1, written by codi2 0.2 and read (never written) here:

    (tenant, "audit", vs, n)               the event as a tuple, or CHUNKED
    (tenant, "audit_chunks", vs, n, i)     part i of an event value over VALUE_MAX
    (tenant, "chain", stream, number)      the batch header and where its events are
    (tenant, "event_ids", event_id)        (vs, n): checked when a batch without a header is written again

`vs` is the commit's versionstamp (incomplete when written: FoundationDB fills it in at commit, so a
tenant's keys sort in one commit order across pods); `p` orders the pieces inside one transaction.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fdb.tuple as fdbtuple
import msgspec

from codi2.stores.base import StoreError
from codi2.trail.events import BatchHeader, Event, decode_events, encode_events

VALUE_MAX = 100_000  # FoundationDB's limit on a value (bytes)
VS_LEN = 10  # a commit versionstamp: 8 bytes of version, 2 of batch order
N_MAX = 0xFFFF  # the largest piece number or part number: what the size estimates count keys with

# v1 (read only)
V1_VALUE_FORMAT = 1
V1_CHAIN_FORMAT = 1
CHUNKED = fdbtuple.pack((2,))  # a v1 audit value whose event is in `audit_chunks`

# v2
PIECE_FORMAT = 2
PROGRESS_FORMAT = 1
_NO_OFFSET = struct.pack("<I", 0)  # set_versionstamped_value: the versionstamp is the value's first 10 bytes

Run = tuple[bytes | None, int, int]  # (commit version or None: this transaction's, first piece or n, count)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class Keys:
    """The key layout under one root prefix. A key holding an incomplete versionstamp is packed for
    `set_versionstamped_key` (its offset appended), every other key as a plain tuple."""

    def __init__(self, root: Sequence[str] = ("codi2",)) -> None:
        self.prefix: bytes = fdbtuple.pack(tuple(root))

    def key(self, *parts: Any) -> bytes:
        if fdbtuple.has_incomplete_versionstamp(parts):
            return bytes(fdbtuple.pack_with_versionstamp(parts, prefix=self.prefix))
        return self.prefix + bytes(fdbtuple.pack(parts))

    def unpack(self, key: bytes) -> tuple[Any, ...]:
        """The parts of a key, the prefix left out: (tenant, namespace, ...)."""
        return tuple(fdbtuple.unpack(key, prefix_len=len(self.prefix)))

    def namespace_range(self, tenant: str, namespace: str, *parts: Any) -> tuple[bytes, bytes]:
        """Every key of the tenant's namespace (below `parts`), and none of another tenant's."""
        base = self.key(tenant, namespace, *parts)
        return base + b"\x00", base + b"\xff"

    # v2

    def log(self, tenant: str, vs: fdbtuple.Versionstamp, p: int) -> bytes:
        return self.key(tenant, "log", vs, p)

    def log_part(self, tenant: str, vs: fdbtuple.Versionstamp, p: int, i: int) -> bytes:
        return self.key(tenant, "log", vs, p, i)

    def progress(self, tenant: str, stream_id: str, number: int) -> bytes:
        return self.key(tenant, "c", stream_id, number)

    def time_index(self, tenant: str, second: int) -> bytes:
        return self.key(tenant, "t", second)

    def session(self, tenant: str, session_id: str, vs: fdbtuple.Versionstamp) -> bytes:
        return self.key(tenant, "s", session_id, vs)

    def stream(self, tenant: str, stream_id: str) -> bytes:
        return self.key(tenant, "streams", stream_id)

    def event_id(self, tenant: str, event_id: str) -> bytes:
        return self.key(tenant, "ids", event_id)

    def probe(self, tenant: str, token: str) -> bytes:
        return self.key(tenant, "probe", token)

    def horizon(self, tenant: str, stream_id: str) -> bytes:
        return self.key(tenant, "h", stream_id)

    # v1

    def audit(self, tenant: str, vs: fdbtuple.Versionstamp, n: int) -> bytes:
        return self.key(tenant, "audit", vs, n)

    def audit_chunks(self, tenant: str, vs: fdbtuple.Versionstamp, n: int) -> bytes:
        """The prefix of a v1 event's chunk keys."""
        return self.key(tenant, "audit_chunks", vs, n)

    def v1_event_id(self, tenant: str, event_id: str) -> bytes:
        return self.key(tenant, "event_ids", event_id)

    def chain(self, tenant: str, stream_id: str, number: int) -> bytes:
        return self.key(tenant, "chain", stream_id, number)


def versionstamped_value(body: bytes) -> bytes:
    """A value for `set_versionstamped_value` whose first 10 bytes FoundationDB fills with the commit's
    versionstamp."""
    return bytes(VS_LEN) + body + _NO_OFFSET


def split_value(value: bytes) -> list[bytes]:
    """A value in parts of at most VALUE_MAX: the first under the piece's key, the rest under its part keys."""
    return [value[i : i + VALUE_MAX] for i in range(0, len(value), VALUE_MAX)] or [b""]


# v2: pieces of the log ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """Events of one batch, consecutive in it from `first`: the unit the log stores under one key."""

    stream_id: str | None  # None: a batch without a header
    number: int | None
    first: int
    events: list[Event]


def encode_piece(stream_id: str | None, number: int | None, first: int, events: Sequence[Event]) -> bytes:
    """The records are the chain's own bytes (`encode_events`, what a link covers), compressed: tenant, user,
    pod, session and root repeat in every record."""
    return _encoder.encode([PIECE_FORMAT, stream_id, number, first, zlib.compress(encode_events(events))])


def decode_piece(value: bytes) -> Piece:
    fmt, stream_id, number, first, records = _decoder.decode(value)
    if fmt != PIECE_FORMAT:
        raise StoreError(f"fdb: unknown piece format {fmt}", code="bad_value")
    return Piece(stream_id, number, first, decode_events(zlib.decompress(records)))


def cursor(piece_key: bytes, index: int) -> bytes:
    """Where an event is in the trail: its piece's key and its index in the piece. Cursors sort in commit order,
    and every v2 cursor after every v1 one (the namespace "log" sorts after "audit")."""
    return piece_key + bytes(fdbtuple.pack((index,)))


# v2: a batch's progress and header ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """A chained batch's `c` value: its header, how many of its events are stored, and in which pieces."""

    header: BatchHeader
    done: int
    runs: tuple[tuple[bytes, int, int], ...]  # (commit version, first piece, pieces), every version filled in

    @property
    def complete(self) -> bool:
        return self.done >= self.header.events


def encode_progress(h: BatchHeader, done: int, runs: Sequence[Run]) -> bytes:
    """Written with `set_versionstamped_value`: a run's version None is this transaction's."""
    body = _encoder.encode([PROGRESS_FORMAT, done, h.ts, h.prev, h.link, h.key_id, h.events, runs])
    return versionstamped_value(body)


def decode_progress(stream_id: str, number: int, value: bytes) -> Progress:
    own = value[:VS_LEN]
    fmt, done, ts, prev, link, key_id, events, runs = _decoder.decode(value[VS_LEN:])
    if fmt != PROGRESS_FORMAT:
        raise StoreError(f"fdb: unknown batch progress format {fmt}", code="bad_value")
    filled = tuple((version or own, first, count) for version, first, count in runs)
    return Progress(BatchHeader(stream_id, number, ts, prev, link, key_id, events), done, filled)


def encode_stream(user_id: str, pod: str, first_ts: str, predecessor: tuple[str, int, bytes] | None) -> bytes:
    return _encoder.encode([user_id, pod, first_ts, predecessor])


def decode_stream(value: bytes) -> tuple[str, str, str, tuple[str, int, bytes] | None]:
    user_id, pod, first_ts, predecessor = _decoder.decode(value)
    return user_id, pod, first_ts, None if predecessor is None else tuple(predecessor)


def piece_stream(value: bytes) -> str | None:
    """A piece's stream (None: a batch without a header), its records left compressed."""
    stream: str | None = _decoder.decode(value)[1]
    return stream


def encode_horizon(number: int, link: bytes, ts: str) -> bytes:
    return _encoder.encode([number, link, ts])


def decode_horizon(value: bytes) -> tuple[int, bytes, str]:
    number, link, ts = _decoder.decode(value)
    return number, link, ts


# v1 (read only) ----------------------------------------------------------------------------------------------


def decode_v1_event(tenant_id: str, value: bytes) -> Event:
    fmt, eid, seq, ts, user, session, pod, action, path, dest, root, typ, size, mode, mtime, sha, origin = (
        fdbtuple.unpack(value)
    )
    if fmt != V1_VALUE_FORMAT:
        raise StoreError(f"fdb: unknown event value format {fmt}", code="bad_value")
    return Event(
        id=eid,
        seq=seq,
        ts=ts,
        tenant_id=tenant_id,
        user_id=user,
        session_id=session,
        pod=pod,
        action=action,
        path=os.fsdecode(path),
        dest_path=None if dest is None else os.fsdecode(dest),
        root=root,
        type=typ,
        size=size,
        mode=mode,
        mtime=mtime,
        sha256=sha,
        origin=origin,
    )


def decode_v1_header(
    stream_id: str, number: int, value: bytes
) -> tuple[BatchHeader, tuple[tuple[bytes, int, int], ...]]:
    """The header and its runs of audit keys, every version filled in."""
    fmt, own, ts, prev, link, key_id, events, stored = fdbtuple.unpack(value)
    if fmt != V1_CHAIN_FORMAT:
        raise StoreError(f"fdb: unknown batch header format {fmt}", code="bad_value")
    where = tuple((version or own.tr_version, first, count) for version, first, count in stored)
    return BatchHeader(stream_id, number, ts, prev, link, key_id, events), where


def throttle_tag(tenant: str) -> str:
    """The tenant's transaction tag (at most 16 bytes, FoundationDB's limit): the id itself when it fits and is
    plain ASCII, else its first characters and a hash, so two long ids sharing a prefix stay apart."""
    if len(tenant.encode()) <= 16 and tenant.isascii() and tenant.isprintable():
        return tenant
    head = "".join(c for c in tenant[:7] if c.isascii() and c.isprintable())
    return f"{head}~{hashlib.sha256(tenant.encode()).hexdigest()[: 15 - len(head)]}"
