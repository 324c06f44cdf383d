"""The FoundationDB sink on the real `fdb` bindings over the fake libfdb_c: the shared contract, then every
fault at an exact point ending with each event exactly once, parts within FDB's limits as FDB counts them,
and tenants that never cross. `tests/fdb_double.py` places the faults; the rest is the library's own."""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fdb_double import FaultyDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sink_contract import SinkContract, batch_of, chain_of, make_event
from tamper import FdbTamper, Tamper

from codi2.config import load_settings
from codi2.stores.base import Sink, StoreError
from codi2.stores.fdb.client import load_fdb, resolve_cluster_file
from codi2.stores.fdb.sink import FdbSink
from codi2.trail.events import Batch, Event, EventQuery, uuid7
from codi2.trail.verify import verify


@pytest.fixture
def db(fdb_api: ModuleType, tmp_path: Path) -> Any:
    """A database of its own for each test (the fake keeps it in `<cluster file>.fakefdb.sqlite`)."""
    return fdb_api.open(str(tmp_path / "fdb.cluster"))


@pytest.fixture
def faulty(db: Any, fdb_api: ModuleType) -> FaultyDatabase:
    return FaultyDatabase(db, fdb_api)


class TestFdbSink(SinkContract):
    @pytest.fixture
    def sink(self, db: Any) -> Sink:
        return FdbSink(db, tenant_id=None)

    @pytest.fixture
    def reopen(self, fdb_api: ModuleType, tmp_path: Path) -> Callable[[], Sink]:
        return lambda: FdbSink(fdb_api.open(str(tmp_path / "fdb.cluster")), tenant_id=None)

    @pytest.fixture
    def tamper(self, db: Any) -> Tamper:
        return FdbTamper(db)


def read_all(sink: FdbSink, tenant: str = "t1") -> list[Event]:
    return [e for _, e in sink.read(EventQuery(tenant))]


def write_until_done(sink: FdbSink, batch: Batch, attempts: int = 10) -> None:
    """What the pipeline does: a batch that fails with a retryable StoreError stays pending and is sent again."""
    for _ in range(attempts):
        try:
            sink.write_batch(batch)
            return
        except StoreError as exc:
            assert exc.retryable and isinstance(exc.code, str)
    raise AssertionError("batch never committed")


FAULTS = [
    ("commit_before", 1020),  # not_committed (conflict): on_error retries
    ("commit_before", 1021),  # commit_unknown_result, did not commit
    ("commit_after", 1021),  # commit_unknown_result, did commit: the id keys stop a second copy
    ("commit_after", 1039),  # cluster_version_changed: may have committed too
    ("read", 1007),  # transaction_too_old on the read of the id keys
    ("commit_before", 1031),  # transaction_timed_out: on_error gives up, the batch stays pending
    ("commit_after", 1031),  # timed out after the commit landed: the re-sent batch must not duplicate
    ("commit_before", 2101),  # transaction_too_large: the part is halved
    ("commit_before", 4242),  # a code FoundationDB does not define
]


@pytest.mark.parametrize(("point", "code"), FAULTS, ids=[f"{p}-{c}" for p, c in FAULTS])
def test_every_fault_ends_with_each_event_exactly_once(faulty: FaultyDatabase, point: str, code: int) -> None:
    sink = FdbSink(faulty, tenant_id="t1")
    sizes = (("a", 20), ("b", 20), ("c", 5))
    first, second, third = chain_of(*([make_event(f"{p}{i}") for i in range(n)] for p, n in sizes))
    sink.write_batch(first)
    faulty.inject(point, code, code)  # twice in a row, to exercise retries of retries
    write_until_done(sink, second)
    write_until_done(sink, second)  # a replay of the whole batch changes nothing
    write_until_done(sink, third)  # meets the second fault if the first retry did not
    paths = [e.path for e in read_all(sink)]
    assert paths == [f"{p}{i}" for p, n in sizes for i in range(n)]
    assert not any(faulty.faults.values())
    assert verify(sink, "t1").ok  # each header stored once, with where every event of its batch is


def test_errors_carry_the_library_description_and_a_str_code(faulty: FaultyDatabase, fdb_api: ModuleType) -> None:
    faulty.inject("commit_before", 1031, 4242)
    sink = FdbSink(faulty, tenant_id="t1")
    for code in (1031, 4242):  # transaction_timed_out, and a code FoundationDB does not define
        with pytest.raises(StoreError) as info:
            sink.write_batch(batch_of(make_event()))
        description = fdb_api.FDBError(code).description
        assert isinstance(description, bytes)  # what the bindings give
        assert info.value.code == f"fdb_{code}"
        assert str(info.value) == f"fdb: {description.decode()} ({code})"
        assert info.value.retryable
        json.dumps({"error_code": info.value.code, "error": str(info.value)})  # what /status does with them


def test_retry_limit_is_respected(faulty: FaultyDatabase) -> None:
    faulty.inject("commit_before", *([1020] * 5))
    with pytest.raises(StoreError, match=r"\(1020\)"):
        FdbSink(faulty, tenant_id="t1", retry_limit=3).write_batch(batch_of(make_event()))
    assert faulty.commit_attempts == 4
    assert read_all(FdbSink(faulty, tenant_id="t1")) == []


def test_a_batch_resent_cut_differently_lands_exactly_once(faulty: FaultyDatabase) -> None:
    """Part 0 committed, part 1 failed, and the batch comes back cut otherwise (another batch_bytes, or a
    new size estimate after an upgrade): every event lands, each once."""
    events = [make_event(f"dir/{uuid.uuid4().hex}/file-{i:03d}.txt") for i in range(100)]  # compress little
    [batch] = chain_of(events)
    faulty.inject("commit_before", None, 1031)  # the first part commits, the second times out
    with pytest.raises(StoreError):
        FdbSink(faulty, tenant_id="t1", batch_bytes=4_000).write_batch(batch)
    sink = FdbSink(faulty, tenant_id="t1")
    assert 0 < len(read_all(sink)) < 100
    assert list(sink.batches("t1", "stream-1")) == []  # a batch is stored once its last part is
    assert verify(sink, "t1").unchained_events == len(read_all(sink))
    FdbSink(faulty, tenant_id="t1", batch_bytes=1_000_000).write_batch(batch)
    assert read_all(sink) == events
    [stored] = sink.batches("t1", "stream-1")
    assert len(stored.where[1]) == 2  # the first part's pieces and the rest, committed in two transactions
    assert verify(sink, "t1").ok


@pytest.mark.parametrize("budget", [1_000_000, 50_000])
def test_parts_stay_within_the_budget_as_foundationdb_counts_them(faulty: FaultyDatabase, budget: int) -> None:
    events = [make_event(f"services/api/src/handlers/v2/module_{i:05d}/implementation_{i:05d}.py") for i in range(3000)]
    sink = FdbSink(faulty, tenant_id="t1", batch_bytes=budget)
    sink.write_batch(chain_of(events)[0])
    assert len(faulty.commit_sizes) > 1 or budget == 1_000_000  # 3,000 events compressed fit in 1 MB
    assert max(faulty.commit_sizes) <= budget  # get_approximate_size(): mutations, conflict ranges, the header
    assert read_all(sink) == events
    assert verify(sink, "t1").ok


def test_transaction_too_large_halves_the_part_until_it_fits(db: Any) -> None:
    db.options.set_transaction_size_limit(20_000)  # FDB's own limit, here far below the sink's budget
    sink = FdbSink(db, tenant_id="t1")
    events = [make_event(f"f{i}") for i in range(200)]
    sink.write_batch(batch_of(*events))
    assert read_all(sink) == events


def test_an_event_over_the_limit_alone_is_reported_as_never_committable(db: Any) -> None:
    db.options.set_transaction_size_limit(5_000)
    sink = FdbSink(db, tenant_id="t1")
    huge = make_event("/".join(uuid.uuid4().hex for _ in range(360)))  # 11,879 bytes, ~6,000 compressed
    sink.write_batch(batch_of(make_event("before")))
    with pytest.raises(StoreError) as info:
        sink.write_batch(batch_of(make_event("small"), huge, make_event("after")))
    assert info.value.retryable is False
    assert info.value.code == "event_too_large"
    assert huge.id in str(info.value) and "(2101)" in str(info.value) and "\n" not in str(info.value)
    assert [e.path for e in read_all(sink)] == ["before", "small"]


def test_a_path_longer_than_a_value_is_split_across_keys(db: Any) -> None:
    sink = FdbSink(db, tenant_id="t1")
    # 255,999 bytes that compress to more than one of FoundationDB's 100,000-byte values
    deep = "/".join(uuid.uuid4().hex * 8 for _ in range(1000))
    events = [make_event("before"), make_event(deep, action="moved", dest_path=deep + "/x"), make_event("after")]
    sink.write_batch(batch_of(*events))
    assert read_all(sink) == events
    rows = db.get_range(b"", b"\xff")
    assert max(len(kv.key) for kv in rows) < 10_000 and max(len(kv.value) for kv in rows) <= 100_000


def test_a_cursor_is_clamped_to_the_tenant_range(db: Any) -> None:
    sink = FdbSink(db, tenant_id=None)
    sink.write_batch(batch_of(*(make_event(f"a{i}", tenant="a") for i in range(3))))
    sink.write_batch(batch_of(*(make_event(f"b{i}", tenant="b") for i in range(3))))
    first_a = next(iter(sink.read(EventQuery("a"))))[0]
    first_b = next(iter(sink.read(EventQuery("b"))))[0]
    assert [e.path for _, e in sink.read(EventQuery("b"), after=first_a)] == ["b0", "b1", "b2"]
    assert list(sink.read(EventQuery("a"), after=first_b)) == []


def test_reads_fetch_a_page_in_one_round_trip(db: Any, fdb_api: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = FdbSink(db, tenant_id="t1")
    sink.write_batch(batch_of(*(make_event(f"f{i:04d}") for i in range(2500))))
    requests = []
    real = fdb_api.impl.TransactionRead._get_range

    def counted(tr: Any, *args: Any) -> Any:
        requests.append(args)
        return real(tr, *args)

    monkeypatch.setattr(fdb_api.impl.TransactionRead, "_get_range", counted)
    assert len(read_all(sink)) == 2500
    assert len(requests) == 2  # v1's range (empty), then the log's one piece


def test_probe_retries_and_leaves_nothing_behind(faulty: FaultyDatabase) -> None:
    sink = FdbSink(faulty, tenant_id=None)
    faulty.inject("commit_before", 1020)  # the write conflicts once
    faulty.inject("commit_after", None, None, 1021)  # the clear lands and the client is not told
    sink.probe("t1")
    assert not any(faulty.faults.values())
    faulty.inject("commit_after", 1031)  # the write lands but times out: the step fails, and still clears
    with pytest.raises(StoreError, match=r"\(1031\)"):
        sink.probe("t1")
    assert list(faulty.get_range_startswith(sink.key("t1", "probe"))) == []


def test_events_of_another_tenant_are_refused(db: Any) -> None:
    with pytest.raises(ValueError, match="another tenant"):
        FdbSink(db, tenant_id="t1").write_batch(batch_of(make_event(tenant="t1"), make_event(tenant="t2")))


def test_non_utf8_names_round_trip_as_bytes(db: Any) -> None:
    sink = FdbSink(db, tenant_id="t1")
    event = make_event(os.fsdecode(b"caf\xe9\n\xff"), action="moved", dest_path=os.fsdecode(b"\x80x"))
    sink.write_batch(batch_of(event))
    [back] = read_all(sink)
    assert back == event and os.fsencode(back.dest_path or "") == b"\x80x"


def test_an_api_version_other_than_the_selected_one_is_refused(fdb_api: ModuleType) -> None:
    assert load_fdb(fdb_api.get_api_version()) is fdb_api
    with pytest.raises(StoreError) as info:
        load_fdb(710)
    assert info.value.code == "api_version_conflict"
    assert str(info.value) == "cannot use FoundationDB API version 710: this process already selected 730"


def _settings(tmp_path: Path, cluster_string: str) -> Any:
    config = tmp_path / "c.toml"
    config.write_text(f'[foundationdb]\ncluster_string = "{cluster_string}"\n[state]\ndir = "{tmp_path / "state"}"\n')
    return load_settings(config)


def test_cluster_string_is_written_only_when_it_names_another_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FDB_CLUSTER_FILE", raising=False)
    path = resolve_cluster_file(_settings(tmp_path, "prod:abc@10.0.0.1:4500"))
    assert path.read_text() == "prod:abc@10.0.0.1:4500\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("prod:abc@10.0.0.7:4500,10.0.0.8:4500\n")  # the client moved to new coordinators
    assert resolve_cluster_file(_settings(tmp_path, "prod:abc@10.0.0.1:4500")).read_text() == (
        "prod:abc@10.0.0.7:4500,10.0.0.8:4500\n"
    )
    assert resolve_cluster_file(_settings(tmp_path, "other:def@10.0.0.9:4500")).read_text() == (
        "other:def@10.0.0.9:4500\n"
    )


tenant_ids = st.text(alphabet=st.sampled_from(["a", "b", "/", "\x00", "\xff", "é", "-"]), min_size=1, max_size=6)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(tenant_ids, min_size=2, max_size=4, unique=True), st.data())
def test_tenant_prefixes_never_cross(db: Any, tenants: list[str], data: st.DataObject) -> None:
    if data.draw(st.booleans()):  # make one tenant id a prefix of another
        tenants = [tenants[0], tenants[0] + tenants[1]]
    root = ("codi2", uuid7())  # each example on a key space of its own
    written: dict[str, list[str]] = {}
    for t in tenants:
        sink = FdbSink(db, tenant_id=t, root=root)
        before = {kv.key for kv in db.get_range_startswith(sink.key())}
        paths = [f"{t}/{i}" for i in range(data.draw(st.integers(1, 4)))]
        sink.write_batch(batch_of(*(make_event(p, tenant=t) for p in paths)))
        after = {kv.key for kv in db.get_range_startswith(sink.key())}
        assert all(k.startswith(sink.key(t)) for k in after - before)
        written[t] = paths
    reader = FdbSink(db, tenant_id=None, root=root)
    for t in tenants:
        events = read_all(reader, t)
        assert [e.path for e in events] == written[t]
        assert Counter(e.id for e in events).most_common(1)[0][1] == 1
