"""FoundationDB layout v2 (issue #23) against what today's release does: the duplicate defect of v1's id
prune, full batches in one commit, and a store written by v1 read, verified and continued by v2."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from fdb_double import FaultyDatabase
from sink_contract import chain_of, make_event

from codi2.stores.base import StoreError
from codi2.stores.fdb.sink import FdbSink
from codi2.trail.events import EventQuery, uuid7
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
