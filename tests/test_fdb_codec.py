"""The FoundationDB key layout and values (`codi2.stores.fdb.codec`) on their own: no transaction, no cluster.
Keys holding a versionstamp need the bindings' API version selected (`fdb_api`: the fake libfdb_c, loaded
in process); the rest runs without it."""

from __future__ import annotations

import hashlib
import os
import struct
from types import ModuleType

import fdb.tuple as fdbtuple
import pytest
from sink_contract import make_event

from codi2.stores.base import StoreError
from codi2.stores.fdb import codec
from codi2.stores.fdb.codec import Keys
from codi2.trail.events import BatchHeader, uuid7

VS = bytes(range(1, 11))  # a commit version


def _committed(packed: bytes) -> bytes:
    """A key or value packed with an incomplete versionstamp as FoundationDB stores it: the commit version
    written at the offset the last four bytes give, those four bytes dropped."""
    (offset,) = struct.unpack("<I", packed[-4:])
    return packed[:offset] + VS + packed[offset + 10 : -4]


def test_every_key_is_the_documented_tuple_under_the_root(fdb_api: ModuleType) -> None:
    keys, vs = Keys(("codi2", "test")), fdbtuple.Versionstamp(VS)
    documented = {
        keys.audit("t1", vs, 3): ("t1", "audit", vs, 3),
        keys.audit_chunk("t1", vs, 3, 1): ("t1", "audit_chunks", vs, 3, 1),
        keys.audit_by_path("t1", b"src/a.py", vs, 3): ("t1", "audit_by_path", b"src/a.py", vs, 3),
        keys.event_id("t1", "id-1"): ("t1", "event_ids", "id-1"),
        keys.chain("t1", "s1", 7): ("t1", "chain", "s1", 7),
        keys.probe("t1", "p"): ("t1", "probe", "p"),
    }
    for key, parts in documented.items():
        assert fdbtuple.unpack(key) == ("codi2", "test", *parts)
        assert keys.unpack(key) == parts
    assert keys.audit_locator(keys.audit("t1", vs, 3)) == (vs, 3)
    assert keys.audit_chunk("t1", vs, 3, 1).startswith(keys.audit_chunks("t1", vs, 3))
    assert keys.chain("t1", "s1", 7).startswith(keys.chain_stream("t1", "s1"))


def test_a_key_with_an_incomplete_versionstamp_is_packed_for_set_versionstamped_key(fdb_api: ModuleType) -> None:
    """FoundationDB reads the position of the versionstamp from the key's last four bytes."""
    keys = Keys()
    stored = _committed(keys.audit("t1", fdbtuple.Versionstamp(), 3))
    assert stored == keys.audit("t1", fdbtuple.Versionstamp(VS), 3)


def test_a_namespace_range_holds_its_keys_and_no_other_tenants() -> None:
    keys = Keys()
    begin, end = keys.namespace_range("t1", "event_ids")
    assert begin <= keys.event_id("t1", "x") < end
    assert not begin <= keys.event_id("t10", "x") < end
    assert not begin <= keys.chain("t1", "s", 1) < end


def test_the_ids_older_than_the_cutoff_are_one_range() -> None:
    keys, cutoff = Keys(), 1_700_000_000_000
    begin, end = keys.event_ids_before("t1", cutoff)
    assert begin <= keys.event_id("t1", uuid7(cutoff - 1)) < end
    assert not begin <= keys.event_id("t1", uuid7(cutoff)) < end
    assert keys.event_ids_before("t1", -5) == keys.event_ids_before("t1", 0)


def test_a_long_path_is_hashed_in_its_by_path_key() -> None:
    short, long = "a" * codec.PATH_KEY_MAX, "a" * (codec.PATH_KEY_MAX + 1)
    assert codec.path_key(short) == short.encode()
    assert codec.path_key(long) == ("sha256", hashlib.sha256(long.encode()).hexdigest())
    assert codec.path_key("caf\udce9") == b"caf\xe9"  # the raw bytes of a name that is not UTF-8


def test_an_event_round_trips_with_its_raw_path_bytes() -> None:
    event = make_event("caf\udce9/x", dest_path="new\nline")
    value = codec.encode_event(event)
    assert fdbtuple.unpack(value)[8] == os.fsencode(event.path)
    assert codec.decode_event(event.tenant_id, value) == event


def test_an_unknown_value_format_is_a_store_error() -> None:
    with pytest.raises(StoreError) as raised:
        codec.decode_event("t1", fdbtuple.pack((9, *range(16))))
    assert raised.value.code == "bad_value"


def test_a_long_value_is_cut_in_parts_that_join_back() -> None:
    value = os.urandom(2 * codec.VALUE_MAX + 1)
    parts = codec.chunks(value)
    assert [len(p) for p in parts] == [codec.VALUE_MAX, codec.VALUE_MAX, 1]
    assert b"".join(parts) == value


def test_locators_become_runs_of_consecutive_audit_keys() -> None:
    where = [(None, 0), (None, 1), (VS, 4), (VS, 5), (VS, 7), (None, 2)]
    assert codec.runs(where) == [(None, 0, 2), (VS, 4, 2), (VS, 7, 1), (None, 2, 1)]


def test_a_header_reads_back_with_its_own_commit_version_filled_in(fdb_api: ModuleType) -> None:
    header = BatchHeader("s1", 3, "2024-01-01T00:00:00.000000Z", b"p" * 32, b"l" * 32, None, 3)
    value = codec.encode_header(header, [(None, 0), (None, 1), (b"\x09" * 10, 4)])
    assert codec.decode_header("s1", 3, _committed(value)) == (header, ((VS, 0, 2), (b"\x09" * 10, 4, 1)))


def test_an_event_id_value_names_where_the_event_is(fdb_api: ModuleType) -> None:
    assert codec.decode_locator(_committed(codec.encode_locator(fdbtuple.Versionstamp(), 5))) == (VS, 5)
