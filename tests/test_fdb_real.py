"""Against a real FoundationDB server: run when CODI2_TEST_FDB_CLUSTER_FILE names its cluster file.

    CODI2_TEST_FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster make test

The same contract as SQLite and the fake libfdb_c, and what only a real cluster can show (docs/fdb-layout.md).
Everything is written under a root prefix unique to the run and cleared afterwards. This process then loads
the installed libfdb_c, so the tests that need the fake in this process are skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fdb import tuple as fdbtuple
from fdb_double import FaultyDatabase
from sink_contract import SinkContract, batch_of, make_event
from tamper import FdbTamper, Tamper

from codi2.stores.base import Sink
from codi2.stores.fdb.client import load_fdb
from codi2.stores.fdb.sink import FdbSink
from codi2.trail.events import EventQuery

CLUSTER_FILE = os.environ.get("CODI2_TEST_FDB_CLUSTER_FILE")
pytestmark = [
    pytest.mark.fdb,
    pytest.mark.skipif(not CLUSTER_FILE, reason="CODI2_TEST_FDB_CLUSTER_FILE is not set: no FoundationDB server"),
]
API_VERSION = int(os.environ.get("CODI2_TEST_FDB_API_VERSION", "730"))


@pytest.fixture(scope="module")
def database() -> tuple[Any, Any]:
    """The loaded `fdb` module and an open `fdb.Database`."""
    fdb_module = load_fdb(API_VERSION)
    return fdb_module, fdb_module.open(CLUSTER_FILE)


@pytest.fixture
def root(database: tuple[Any, Any]) -> Iterator[tuple[str, ...]]:
    _, db = database
    root = ("codi2-test", uuid.uuid4().hex)
    yield root
    begin = fdbtuple.pack(root)
    db.clear_range(begin, begin + b"\xff")


class TestRealFdbSink(SinkContract):
    @pytest.fixture
    def sink(self, database: tuple[Any, Any], root: tuple[str, ...]) -> Sink:
        return FdbSink(database[1], tenant_id=None, root=root)

    @pytest.fixture
    def reopen(self, database: tuple[Any, Any], root: tuple[str, ...]) -> Callable[[], Sink]:
        return lambda: FdbSink(database[1], tenant_id=None, root=root)

    @pytest.fixture
    def tamper(self, database: tuple[Any, Any], root: tuple[str, ...]) -> Tamper:
        return FdbTamper(database[1], root)


def test_versionstamps_order_batches_and_probe_works(database: tuple[Any, Any], root: tuple[str, ...]) -> None:
    sink = FdbSink(database[1], tenant_id="t1", root=root)
    for i in range(5):
        sink.write_batch(batch_of(*(make_event(f"{i}-{j}") for j in range(50))))
    assert [e.path for _, e in sink.read(EventQuery("t1"))] == [f"{i}-{j}" for i in range(5) for j in range(50)]
    sink.probe("t1")
    assert list(database[1].get_range_startswith(sink.key("t1", "probe"))) == []
    assert sink.cluster_status().get("client", {}).get("database_status", {}).get("available") is True


def test_parts_stay_within_the_budget_as_the_real_client_counts_them(
    database: tuple[Any, Any], root: tuple[str, ...]
) -> None:
    fdb_module, db = database
    faulty = FaultyDatabase(db, fdb_module)  # no faults: it records get_approximate_size() at each commit
    sink = FdbSink(faulty, tenant_id="t1", root=root)
    events = [make_event(f"services/api/src/module_{i:05d}/implementation_{i:05d}.py") for i in range(3000)]
    sink.write_batch(batch_of(*events))
    assert len(faulty.commit_sizes) > 1 and max(faulty.commit_sizes) <= 1_000_000
    assert [e for _, e in sink.read(EventQuery("t1"))] == events
