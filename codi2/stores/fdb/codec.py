"""The FoundationDB key layout and value codec, in one place (docs/fdb-layout.md).

Pure: functions of their arguments over `fdb.tuple`, no transaction and no cluster, so a layout change
is tested here first. (The bindings pack a versionstamp only once an API version is selected, which loads
libfdb_c; everything else here runs without it.) Every key is a tuple under the root prefix
(`[foundationdb] root_prefix`, tuple-packed), then the tenant, then a namespace:

    key                                          value
    (tenant, "audit", vs, n)                     the encoded event, or CHUNKED: the trail in commit order
    (tenant, "audit_chunks", vs, n, i)           part i of an encoded event over VALUE_MAX
    (tenant, "audit_by_path", path_key, vs, n)   the event id: per-file history
    (tenant, "event_ids", event_id)              (vs, n), where the event is: makes writes idempotent
    (tenant, "chain", stream_id, number)         the batch header and where its events are
    (tenant, "probe", uuid)                      a random token, written and cleared by `codi2 test`

`vs` is the commit's versionstamp (incomplete when written: FoundationDB fills it in at commit, so a
tenant's keys sort in one commit order across pods); `n` orders the events inside one transaction.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import fdb.tuple as fdbtuple

from codi2.stores.base import StoreError
from codi2.trail.events import BatchHeader, Event

VALUE_FORMAT = 1
CHAIN_FORMAT = 1
CHUNKED = fdbtuple.pack((2,))  # the audit value of an event too long for one value: it is in `audit_chunks`
VALUE_MAX = 100_000  # FoundationDB's limit on a value (bytes)
PATH_KEY_MAX = 2048  # longer paths are hashed in the by-path key, which keeps keys under FDB's 10,000 bytes
N_MAX = 0xFFFF  # the largest `n` (and chunk number): what the size estimates count keys with

Locator = tuple[bytes | None, int]  # an event's audit key: (commit version, n); None: the current transaction's
PathKey = bytes | tuple[str, str]
Run = tuple[bytes | None, int, int]  # (commit version, first n, count): consecutive audit keys of one batch


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

    def namespace_range(self, tenant: str, namespace: str) -> tuple[bytes, bytes]:
        """Every key of the tenant's namespace, and none of another tenant's."""
        base = self.key(tenant, namespace)
        return base + b"\x00", base + b"\xff"

    def audit(self, tenant: str, vs: fdbtuple.Versionstamp, n: int) -> bytes:
        return self.key(tenant, "audit", vs, n)

    def audit_locator(self, key: bytes) -> tuple[fdbtuple.Versionstamp, int]:
        """(vs, n) of an audit key."""
        _, _, vs, n = self.unpack(key)
        return vs, n

    def audit_chunks(self, tenant: str, vs: fdbtuple.Versionstamp, n: int) -> bytes:
        """The prefix of an event's chunk keys."""
        return self.key(tenant, "audit_chunks", vs, n)

    def audit_chunk(self, tenant: str, vs: fdbtuple.Versionstamp, n: int, i: int) -> bytes:
        return self.key(tenant, "audit_chunks", vs, n, i)

    def audit_by_path(self, tenant: str, path_key: PathKey, vs: fdbtuple.Versionstamp, n: int) -> bytes:
        return self.key(tenant, "audit_by_path", path_key, vs, n)

    def event_id(self, tenant: str, event_id: str) -> bytes:
        return self.key(tenant, "event_ids", event_id)

    def event_ids_before(self, tenant: str, cutoff_ms: int) -> tuple[bytes, bytes]:
        """The id keys of events older than `cutoff_ms` (Unix ms): one range, because event ids are UUIDv7
        (time first, fixed-width hex)."""
        text = f"{max(cutoff_ms, 0):012x}"
        begin, _ = self.namespace_range(tenant, "event_ids")
        return begin, self.event_id(tenant, f"{text[:8]}-{text[8:]}")

    def chain(self, tenant: str, stream_id: str, number: int) -> bytes:
        return self.key(tenant, "chain", stream_id, number)

    def chain_stream(self, tenant: str, stream_id: str) -> bytes:
        """The prefix of a stream's header keys."""
        return self.key(tenant, "chain", stream_id)

    def probe(self, tenant: str, token: str) -> bytes:
        return self.key(tenant, "probe", token)


def path_key(path: str) -> PathKey:
    """The by-path key's path: its raw bytes, or their hash when they would make the key too long."""
    raw = os.fsencode(path)
    return raw if len(raw) <= PATH_KEY_MAX else ("sha256", hashlib.sha256(raw).hexdigest())


def encode_event(event: Event) -> bytes:
    """The stored value: a tuple, tenant left out (it is in the key), paths as their raw bytes."""
    return bytes(
        fdbtuple.pack(
            (
                VALUE_FORMAT,
                event.id,
                event.seq,
                event.ts,
                event.user_id,
                event.session_id,
                event.pod,
                event.action,
                os.fsencode(event.path),
                None if event.dest_path is None else os.fsencode(event.dest_path),
                event.root,
                event.type,
                event.size,
                event.mode,
                event.mtime,
                event.sha256,
                event.origin,
            )
        )
    )


def decode_event(tenant_id: str, value: bytes) -> Event:
    fmt, eid, seq, ts, user, session, pod, action, path, dest, root, typ, size, mode, mtime, sha, origin = (
        fdbtuple.unpack(value)
    )
    if fmt != VALUE_FORMAT:
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


def chunks(value: bytes) -> list[bytes]:
    """An encoded event over VALUE_MAX, in the parts stored under `audit_chunks`."""
    return [value[i : i + VALUE_MAX] for i in range(0, len(value), VALUE_MAX)]


def encode_locator(vs: fdbtuple.Versionstamp, n: int) -> bytes:
    """An `event_ids` value, written with `set_versionstamped_value` when `vs` is incomplete."""
    return bytes(fdbtuple.pack_with_versionstamp((vs, n)))


def decode_locator(value: bytes) -> Locator:
    vs, n = fdbtuple.unpack(value)
    return vs.tr_version, n


def runs(where: Sequence[Locator]) -> list[Run]:
    """The locators of a batch's events as runs of consecutive audit keys of one commit."""
    found: list[list[Any]] = []
    for version, n in where:
        if found and found[-1][0] == version and found[-1][1] + found[-1][2] == n:
            found[-1][2] += 1
        else:
            found.append([version, n, 1])
    return [(version, first, count) for version, first, count in found]


def encode_header(h: BatchHeader, where: Sequence[Locator]) -> bytes:
    """A header's value, written with `set_versionstamped_value`: a run's version None is this
    transaction's, which FoundationDB writes into the value's own versionstamp."""
    value = (CHAIN_FORMAT, fdbtuple.Versionstamp(), h.ts, h.prev, h.link, h.key_id, h.events, tuple(runs(where)))
    return bytes(fdbtuple.pack_with_versionstamp(value))


def decode_header(stream_id: str, number: int, value: bytes) -> tuple[BatchHeader, tuple[tuple[bytes, int, int], ...]]:
    """The header and its runs, every version filled in."""
    fmt, own, ts, prev, link, key_id, events, stored = fdbtuple.unpack(value)
    if fmt != CHAIN_FORMAT:
        raise StoreError(f"fdb: unknown batch header format {fmt}", code="bad_value")
    where = tuple((version or own.tr_version, first, count) for version, first, count in stored)
    return BatchHeader(stream_id, number, ts, prev, link, key_id, events), where
