"""The FoundationDB key layout and values (`codi2.stores.fdb.codec`) on their own: no transaction, no cluster.
Keys holding a versionstamp need the bindings' API version selected (`fdb_api`: the fake libfdb_c, loaded
in process); the rest runs without it."""

from __future__ import annotations

import os
import struct
import zlib
from types import ModuleType

import fdb.tuple as fdbtuple
import msgspec
import pytest
from fdb_v1_writer import v1_value
from sink_contract import make_event

from codi2.stores.base import StoreError
from codi2.stores.fdb import codec
from codi2.stores.fdb.codec import Keys
from codi2.trail.events import BatchHeader, encode_events

VS = bytes(range(1, 11))  # a commit version


def _committed(packed: bytes) -> bytes:
    """A key or value packed with an incomplete versionstamp as FoundationDB stores it: the commit version
    written at the offset the last four bytes give, those four bytes dropped."""
    (offset,) = struct.unpack("<I", packed[-4:])
    return packed[:offset] + VS + packed[offset + 10 : -4]


def test_every_key_is_the_documented_tuple_under_the_root(fdb_api: ModuleType) -> None:
    keys, vs = Keys(("codi2", "test")), fdbtuple.Versionstamp(VS)
    documented = {
        keys.log("t1", vs, 3): ("t1", "log", vs, 3),
        keys.log_part("t1", vs, 3, 1): ("t1", "log", vs, 3, 1),
        keys.progress("t1", "s1", 7): ("t1", "c", "s1", 7),
        keys.time_index("t1", 1_700_000_000): ("t1", "t", 1_700_000_000),
        keys.session("t1", "ses-1", vs): ("t1", "s", "ses-1", vs),
        keys.stream("t1", "s1"): ("t1", "streams", "s1"),
        keys.event_id("t1", "id-1"): ("t1", "ids", "id-1"),
        keys.probe("t1", "p"): ("t1", "probe", "p"),
        keys.audit("t1", vs, 3): ("t1", "audit", vs, 3),
        keys.v1_event_id("t1", "id-1"): ("t1", "event_ids", "id-1"),
        keys.chain("t1", "s1", 7): ("t1", "chain", "s1", 7),
    }
    for key, parts in documented.items():
        assert fdbtuple.unpack(key) == ("codi2", "test", *parts)
        assert keys.unpack(key) == parts
    assert keys.log_part("t1", vs, 3, 1).startswith(keys.log("t1", vs, 3))  # a piece's parts sort right after it
    assert not keys.log("t1", vs, 30).startswith(keys.log("t1", vs, 3))


def test_a_key_with_an_incomplete_versionstamp_is_packed_for_set_versionstamped_key(fdb_api: ModuleType) -> None:
    """FoundationDB reads the position of the versionstamp from the key's last four bytes."""
    keys = Keys()
    stored = _committed(keys.log("t1", fdbtuple.Versionstamp(), 3))
    assert stored == keys.log("t1", fdbtuple.Versionstamp(VS), 3)


def test_a_namespace_range_holds_its_keys_and_no_other_tenants() -> None:
    keys = Keys()
    begin, end = keys.namespace_range("t1", "ids")
    assert begin <= keys.event_id("t1", "x") < end
    assert not begin <= keys.event_id("t10", "x") < end
    assert not begin <= keys.progress("t1", "s", 1) < end
    begin, end = keys.namespace_range("t1", "c", "s")
    assert begin <= keys.progress("t1", "s", 1) < end and not begin <= keys.progress("t1", "s2", 1) < end


def test_every_v2_cursor_sorts_after_every_v1_one_and_in_commit_order(fdb_api: ModuleType) -> None:
    keys, early, late = Keys(), fdbtuple.Versionstamp(VS), fdbtuple.Versionstamp(b"\xff" * 10)
    v1_last = keys.audit("t1", late, 0xFFFF)
    ordered = [
        codec.cursor(keys.log("t1", early, 0), 0),
        codec.cursor(keys.log("t1", early, 0), 300),
        codec.cursor(keys.log("t1", early, 1), 0),
        codec.cursor(keys.log("t1", late, 0), 0),
    ]
    assert v1_last < ordered[0] and ordered == sorted(ordered)
    assert ordered[-1] < keys.namespace_range("t1", "log")[1]


def test_a_piece_holds_the_chain_records_compressed() -> None:
    events = [make_event(f"src/caf\udce9/{i}.py", session_id="ses-1") for i in range(200)]
    value = codec.encode_piece("s1", 4, 17, events)
    fmt, stream, number, first, records = msgspec.msgpack.decode(value)
    assert (fmt, stream, number, first) == (2, "s1", 4, 17)
    assert zlib.decompress(records) == encode_events(events)  # the bytes a link covers, as they are
    assert len(value) * 3 <= len(encode_events(events))
    assert codec.decode_piece(value) == codec.Piece("s1", 4, 17, events)
    with pytest.raises(StoreError) as raised:
        codec.decode_piece(msgspec.msgpack.encode([9, None, None, 0, b""]))
    assert raised.value.code == "bad_value"


def test_progress_reads_back_with_its_own_commit_version_filled_in() -> None:
    header = BatchHeader("s1", 3, "2024-01-01T00:00:00.000000Z", b"p" * 32, b"l" * 32, None, 3)
    value = codec.encode_progress(header, 3, [(b"\x09" * 10, 0, 2), (None, 0, 1)])
    progress = codec.decode_progress("s1", 3, _committed(value))
    assert progress == codec.Progress(header, 3, ((b"\x09" * 10, 0, 2), (VS, 0, 1)))
    assert progress.complete and not codec.Progress(header, 2, ()).complete


def test_a_stream_entry_round_trips() -> None:
    value = codec.encode_stream("u1", "pod-1", "2024-01-01T00:00:00.000000Z", ("s0", 41, b"l" * 32))
    assert codec.decode_stream(value) == ("u1", "pod-1", "2024-01-01T00:00:00.000000Z", ("s0", 41, b"l" * 32))


def test_a_long_value_is_cut_in_parts_that_join_back() -> None:
    value = os.urandom(2 * codec.VALUE_MAX + 1)
    parts = codec.split_value(value)
    assert [len(p) for p in parts] == [codec.VALUE_MAX, codec.VALUE_MAX, 1]
    assert b"".join(parts) == value


def test_a_v1_event_reads_back_with_its_raw_path_bytes() -> None:
    event = make_event("caf\udce9/x", dest_path="new\nline")
    value = v1_value(event)
    assert fdbtuple.unpack(value)[8] == os.fsencode(event.path)
    assert codec.decode_v1_event(event.tenant_id, value) == event
    with pytest.raises(StoreError) as raised:
        codec.decode_v1_event("t1", fdbtuple.pack((9, *range(16))))
    assert raised.value.code == "bad_value"


def test_a_v1_header_reads_back_with_its_own_commit_version_filled_in(fdb_api: ModuleType) -> None:
    header = BatchHeader("s1", 3, "2024-01-01T00:00:00.000000Z", b"p" * 32, b"l" * 32, None, 3)
    runs = ((None, 0, 2), (b"\x09" * 10, 4, 1))
    value = (1, fdbtuple.Versionstamp(), header.ts, header.prev, header.link, None, 3, runs)
    packed = bytes(fdbtuple.pack_with_versionstamp(value))
    assert codec.decode_v1_header("s1", 3, _committed(packed)) == (header, ((VS, 0, 2), (b"\x09" * 10, 4, 1)))


def test_a_throttle_tag_is_at_most_16_bytes_and_tells_tenants_apart() -> None:
    assert codec.throttle_tag("acme") == "acme"
    long_a, long_b = "tenant-1700000000000-a", "tenant-1700000000000-b"
    tags = {codec.throttle_tag(t) for t in (long_a, long_b, "é" * 20)}
    assert len(tags) == 3 and all(len(t.encode()) <= 16 and t.isascii() for t in tags)
