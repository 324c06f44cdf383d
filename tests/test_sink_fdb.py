"""The FoundationDB sink on the fault-injecting double: the shared contract, then every injected
fault ending with each event exactly once, batches split by size, and tenants that never cross."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from fdb_double import FakeDatabase, FakeFDBError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sink_contract import SinkContract, batch_of, make_event

from codi2.events import Batch, Event, EventQuery
from codi2.sinks import Sink, StoreError
from codi2.sinks.fdb import FdbSink


def fdb_sink(db: FakeDatabase, tenant: str | None = "t1", **kw) -> FdbSink:
    return FdbSink(db, FakeFDBError, tenant_id=tenant, **kw)


class TestFdbSink(SinkContract):
    @pytest.fixture
    def db(self) -> FakeDatabase:
        return FakeDatabase()

    @pytest.fixture
    def sink(self, db: FakeDatabase) -> Sink:
        return fdb_sink(db, tenant=None)

    @pytest.fixture
    def reopen(self, db: FakeDatabase) -> Callable[[], Sink]:
        return lambda: fdb_sink(db, tenant=None)


def read_all(sink: FdbSink, tenant: str = "t1") -> list[Event]:
    return [e for _, e in sink.read(EventQuery(tenant))]


def write_until_done(sink: FdbSink, batch: Batch, attempts: int = 10) -> int:
    """What the pipeline does: a batch that fails stays pending and is written again."""
    for attempt in range(1, attempts + 1):
        try:
            sink.write_batch(batch)
            return attempt
        except StoreError:
            continue
    raise AssertionError("batch never committed")


FAULTS = [
    ("commit_before", 1020),  # not_committed (conflict): retried by on_error
    ("commit_before", 1021),  # commit_unknown_result, did not commit
    ("commit_after", 1021),  # commit_unknown_result, did commit: the marker stops a second copy
    ("read", 1007),  # transaction_too_old on the marker read
    ("commit_before", 1031),  # transaction_timed_out: not retryable, the batch stays pending
    ("commit_after", 1031),  # timed out after the commit landed: the rewrite must not duplicate
    ("commit_before", 2101),  # transaction_too_large: split in two
]


@pytest.mark.parametrize(("point", "code"), FAULTS, ids=[f"{p}-{c}" for p, c in FAULTS])
def test_every_fault_ends_with_each_event_exactly_once(point: str, code: int) -> None:
    db = FakeDatabase()
    sink = fdb_sink(db)
    first = batch_of(*(make_event(f"a{i}") for i in range(20)))
    second = batch_of(*(make_event(f"b{i}") for i in range(20)))
    sink.write_batch(first)
    db.inject(point, code, code)  # twice in a row, to exercise retries of retries
    write_until_done(sink, second)
    write_until_done(sink, second)  # a replay of the whole batch changes nothing
    third = batch_of(*(make_event(f"c{i}") for i in range(5)))
    write_until_done(sink, third)  # meets the second fault if the first retry did not
    paths = [e.path for e in read_all(sink)]
    assert paths == [f"{p}{i}" for p, n in (("a", 20), ("b", 20), ("c", 5)) for i in range(n)]
    assert not db.faults[point]


def test_unretryable_error_is_reported_with_name_and_code() -> None:
    db = FakeDatabase()
    db.inject("commit_before", 1031)
    with pytest.raises(StoreError) as info:
        fdb_sink(db).write_batch(batch_of(make_event()))
    assert info.value.code == "transaction_timed_out"
    assert str(info.value) == "fdb: transaction_timed_out (1031)"


def test_retry_limit_is_respected() -> None:
    db = FakeDatabase()
    db.inject("commit_before", *([1020] * 5))
    with pytest.raises(StoreError, match=r"not_committed \(1020\)"):
        fdb_sink(db, retry_limit=3).write_batch(batch_of(make_event()))
    assert db.attempts == 4
    assert read_all(fdb_sink(db)) == []


def test_big_batches_are_split_by_the_byte_budget() -> None:
    db = FakeDatabase()
    sink = fdb_sink(db, batch_bytes=4_000)
    events = [make_event(f"dir/file-{i:04d}.txt") for i in range(200)]
    sink.write_batch(batch_of(*events))
    assert db.commits > 10
    assert read_all(sink) == events


def test_transaction_too_large_halves_until_it_fits() -> None:
    db = FakeDatabase(max_transaction_bytes=6_000)
    sink = fdb_sink(db, batch_bytes=1_000_000)
    events = [make_event(f"f{i}") for i in range(100)]
    sink.write_batch(batch_of(*events))
    assert read_all(sink) == events


def test_very_long_path_is_kept_and_hashed_in_the_key() -> None:
    db = FakeDatabase()
    sink = fdb_sink(db)
    long_path = "/".join(["d" * 250] * 24)  # 6,000 bytes
    event = make_event(long_path)
    sink.write_batch(batch_of(event))
    assert read_all(sink) == [event]
    assert all(len(k) < 10_000 for k in db.data)


def test_events_of_another_tenant_are_refused() -> None:
    sink = fdb_sink(FakeDatabase(), tenant="t1")
    with pytest.raises(ValueError, match="another tenant"):
        sink.write_batch(batch_of(make_event(tenant="t1"), make_event(tenant="t2")))


def test_non_utf8_names_round_trip_as_bytes() -> None:
    sink = fdb_sink(FakeDatabase())
    event = make_event(os.fsdecode(b"caf\xe9\n\xff"), action="moved", dest_path=os.fsdecode(b"\x80x"))
    sink.write_batch(batch_of(event))
    [back] = read_all(sink)
    assert back == event and os.fsencode(back.dest_path or "") == b"\x80x"


def test_old_batch_markers_are_pruned() -> None:
    db = FakeDatabase()
    sink = fdb_sink(db, marker_retention_s=3600)
    old_id = "00000000-0001-7000-8000-000000000000"  # a UUIDv7 from 1970
    sink._parts_written = 1  # the old batch is written without pruning
    sink.write_batch(Batch(old_id, (make_event("old"),)))
    assert db.data.get(sink.key("t1", "batches", f"{old_id}.0")) is not None
    sink._parts_written = 0  # the next write prunes
    sink.write_batch(batch_of(make_event("new")))
    markers = [k for k in db.data if k.startswith(sink.key("t1", "batches"))]
    assert len(markers) == 1 and sink.key("t1", "batches", f"{old_id}.0") not in markers
    assert [e.path for e in read_all(sink)] == ["old", "new"]


tenant_ids = st.text(alphabet=st.sampled_from(["a", "b", "/", "\x00", "\xff", "é", "-"]), min_size=1, max_size=6)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(tenant_ids, min_size=2, max_size=4, unique=True), st.data())
def test_tenant_prefixes_never_cross(tenants: list[str], data: st.DataObject) -> None:
    if data.draw(st.booleans()):  # make one tenant id a prefix of another
        tenants = [tenants[0], tenants[0] + tenants[1]]
    db = FakeDatabase()
    written: dict[str, list[str]] = {}
    for t in tenants:
        sink = fdb_sink(db, tenant=t)
        before = set(db.data)
        paths = [f"{t}/{i}" for i in range(data.draw(st.integers(1, 4)))]
        sink.write_batch(batch_of(*(make_event(p, tenant=t) for p in paths)))
        assert all(k.startswith(sink.key(t)) for k in set(db.data) - before)
        written[t] = paths
    reader = fdb_sink(db, tenant=None)
    for t in tenants:
        assert [e.path for e in read_all(reader, t)] == written[t]
        assert {e.tenant_id for e in read_all(reader, t)} <= {t}
