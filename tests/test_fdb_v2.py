"""FoundationDB layout v2 (issue #23) against what today's release does: the duplicate defect of v1's id
prune, full batches in one commit, and a store written by v1 read, verified and continued by v2."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import fakefdb
import pytest
from fdb_double import FaultyDatabase
from fdb_v1_writer import V1Writer
from sink_contract import chain_of, make_event

from codi2.stores.base import StoreError
from codi2.stores.fdb import codec
from codi2.stores.fdb.sink import FdbSink
from codi2.trail.events import Event, EventQuery, uuid7
from codi2.trail.verify import verify

DAY_MS = 86_400_000


@pytest.fixture
def faulty(fdb_api: ModuleType, tmp_path: Path) -> FaultyDatabase:
    return FaultyDatabase(fdb_api.open(str(tmp_path / "fdb.cluster")), fdb_api)


def test_a_batch_cut_in_parts_and_failing_late_is_stored_exactly_once(faulty: FaultyDatabase) -> None:
    """v1 pruned old `event_ids` every 100th transaction, inside a multi-part batch too: a batch that waited
    8 days in the spool, its part 2 the 100th transaction, pruned the ids part 1 had just written; part 3
    timed out (1031) and the batch, sent again, stored part 1 a second time (87 events, 27 ids twice)."""
    sink = FdbSink(faulty, tenant_id="t1", batch_bytes=31_000)  # v1 cut the batch in 3 parts
    old_ms = int(time.time() * 1000) - 8 * DAY_MS  # spooled through an 8-day outage
    events = [make_event(f"spooled/{i:02d}/" + "x" * 120, id=uuid7(old_ms + i)) for i in range(60)]
    *before, batch = chain_of(*([make_event(f"before/{i}")] for i in range(99)), events)
    for one in before:  # the sink's transactions before the batch: its part 2 is the 100th
        sink.write_batch(one)
    faulty.inject("commit_before", None, None, 1031)  # parts 1 and 2 commit, part 3 times out
    while True:
        try:
            sink.write_batch(batch)
            break
        except StoreError as exc:
            assert exc.code == "fdb_1031"
    faulty.faults["commit_before"].clear()  # v2 commits the batch (compressed: 11 KB) at once
    ids = Counter(e.id for _, e in sink.read(EventQuery("t1")))
    assert sum(ids.values()) == 99 + 60 and ids.most_common(1)[0][1] == 1
    assert verify(sink, "t1").ok


def _seed_like(count: int, tenant: str, ts: float | None = None) -> list[Event]:
    """Events with the ids the seed tool gives (tenant-<ms>, usr-…, ses-<uuid>) and 40-byte paths."""
    user, session = f"usr-{uuid.uuid4().hex[:12]}", f"ses-{uuid.uuid4()}"
    ts = time.time() if ts is None else ts
    return [
        make_event(
            f"src/pkg_{i % 97:03d}/module_{i:06d}_handler.py"[:40],
            tenant=tenant,
            user_id=user,
            session_id=session,
            ts=ts + i / 1000,
            sha256=os.urandom(32).hex(),  # what compresses least: every file's own hash
            size=int.from_bytes(os.urandom(2)),
        )
        for i in range(count)
    ]


def _footprint(db: Any, prefix: bytes) -> tuple[int, int]:
    """Keys and bytes (keys and values) stored under a prefix."""
    rows = list(db.get_range_startswith(prefix))
    return len(rows), sum(len(kv.key) + len(kv.value) for kv in rows)


def test_a_full_batch_of_seed_like_events_is_one_commit_and_smaller_than_v1(faulty: FaultyDatabase) -> None:
    tenant = f"tenant-{int(time.time() * 1000)}"
    batches = chain_of(*(_seed_like(1000, tenant) for _ in range(3)))
    v2 = FdbSink(faulty, tenant_id=tenant, root=("v2",))
    for batch in batches:
        before = faulty.commit_attempts
        v2.write_batch(batch)
        assert faulty.commit_attempts - before == 1  # no aborted attempt, no second part
    v1 = V1Writer(faulty, root=("v1",))
    for batch in batches:
        v1.write_batch(batch)
    v2_keys, v2_bytes = _footprint(faulty, v2.key(tenant))
    v1_keys, v1_bytes = _footprint(faulty, v1.keys.key(tenant))
    events = 3000
    print(
        f"\nper event: v1 {v1_keys / events:.2f} keys, {v1_bytes / events:.0f} B;"
        f" v2 {v2_keys / events:.4f} keys, {v2_bytes / events:.0f} B ({v2_bytes / v1_bytes:.0%} of v1);"
        f" transaction sizes {faulty.commit_sizes[:3]}"
    )
    assert v2_keys / events <= 1.2 and v2_bytes <= 0.6 * v1_bytes
    assert [e for _, e in v2.read(EventQuery(tenant))] == [e for b in batches for e in b.events]
    assert verify(v2, tenant).ok


def test_a_v1_store_reads_verifies_and_its_streams_go_on_in_v2(faulty: FaultyDatabase) -> None:
    """A store as codi2 0.2 left it: a chained stream, and another tenant's. The new sink reads every event in
    order, follows from a v1 cursor into v2, verifies, takes a v1 batch replayed after the upgrade as stored,
    and chains the stream on with the next numbers."""
    batches = chain_of(*([make_event(f"v1/{b}/{i}", session_id="ses-1") for i in range(3)] for b in range(5)))
    old, new = batches[:3], batches[3:]
    other = chain_of([make_event("other", tenant="t2")], stream="stream-2")
    writer = V1Writer(faulty)
    for batch in [*old, *other]:
        writer.write_batch(batch)
    sink = FdbSink(faulty, tenant_id="t1")
    rows = list(sink.read(EventQuery("t1")))
    assert [e for _, e in rows] == [e for b in old for e in b.events]
    assert verify(sink, "t1").ok and verify(sink, "t2").ok
    sink.write_batch(old[-1])  # replayed after the upgrade (the outbox had not heard of its commit)
    for batch in new:
        sink.write_batch(batch)
    assert [e for _, e in sink.read(EventQuery("t1"))] == [e for b in batches for e in b.events]
    assert [e for _, e in sink.read(EventQuery("t1"), after=rows[-1][0])] == [e for b in new for e in b.events]
    report = verify(sink, "t1")
    assert report.ok and [(s.stream_id, s.batches, s.events) for s in report.streams] == [("stream-1", 5, 15)]
    assert [b.header for b in sink.batches("t1", "stream-1")] == [b.header for b in batches]
    assert [e.path for _, e in sink.read(EventQuery("t2"))] == ["other"]


def test_since_reads_from_the_time_index(
    faulty: FaultyDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`events --since` for the last 1% of a 20,000-event tenant reads at most 5% of the keys a full read does
    (the fake's read counters)."""
    start = 1_700_000_000
    clock = iter(range(start, start + 10_000, 10))  # each batch 10 s after the last, by the pod's clock
    sink = FdbSink(faulty, tenant_id="t1", clock=lambda: next(clock))
    batches = chain_of(*(_seed_like(100, "t1", ts=start + 10 * b) for b in range(200)))
    for batch in batches:
        sink.write_batch(batch)
    data = Path(f"{tmp_path / 'fdb.cluster'}.fakefdb.sqlite")
    monkeypatch.setenv("FAKEFDB_COUNT_READS", "1")

    def reading(query: EventQuery) -> tuple[int, int, list[Event]]:
        before = fakefdb.counters(data)
        found = [e for _, e in sink.read(query)]
        after = fakefdb.counters(data)
        keys, read = (after[k] - before.get(k, 0) for k in ("keys_read", "bytes_read"))
        return keys, read, found

    full_keys, full_bytes, everything = reading(EventQuery("t1"))
    since = datetime.fromtimestamp(start + 10 * 198, UTC)
    keys, read_bytes, last = reading(EventQuery("t1", since=since))
    print(f"\nread: full {full_keys} keys, {full_bytes} B; --since (last 1%) {keys} keys, {read_bytes} B")
    assert len(everything) == 20_000 and last == everything[-200:]
    assert keys <= 0.05 * full_keys and read_bytes <= 0.05 * full_bytes


class _Options:
    """A transaction's options, each call recorded before the real bindings (and the fake) take it."""

    def __init__(self, options: Any, calls: list[tuple[str, tuple[Any, ...]]]) -> None:
        self._options, self._calls = options, calls

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self._calls.append((name, args))
            return getattr(self._options, name)(*args)

        return call


def test_a_tenant_s_transactions_carry_its_tag_and_a_backlog_runs_at_batch_priority(
    faulty: FaultyDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = []
    create = faulty.create_transaction

    def recorded() -> Any:
        tr = create()
        monkeypatch.setattr(tr, "options", _Options(tr._tr.options, calls), raising=False)
        return tr

    monkeypatch.setattr(faulty, "create_transaction", recorded)
    tenant = "tenant-1700000000000-with-a-long-id"
    sink = FdbSink(faulty, tenant_id=tenant)
    first, second = chain_of([make_event("a", tenant=tenant)], [make_event("b", tenant=tenant)])
    sink.write_batch(first)
    tags = {args for name, args in calls if name == "set_auto_throttle_tag"}
    assert tags == {(codec.throttle_tag(tenant),)} and ("set_priority_batch", ()) not in calls
    sink.draining_backlog(True)
    sink.write_batch(second)
    assert ("set_priority_batch", ()) in calls
    assert [e.path for _, e in sink.read(EventQuery(tenant))] == ["a", "b"]
