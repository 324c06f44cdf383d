"""Against a real FoundationDB server: run when CODI2_TEST_FDB_CLUSTER_FILE names its cluster file.

    CODI2_TEST_FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster make test

Everything is written under a root prefix unique to the run and cleared afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fdb import tuple as fdbtuple
from sink_contract import SinkContract, batch_of, make_event

from codi2.events import EventQuery
from codi2.sinks import Sink

CLUSTER_FILE = os.environ.get("CODI2_TEST_FDB_CLUSTER_FILE")
pytestmark = [
    pytest.mark.fdb,
    pytest.mark.skipif(not CLUSTER_FILE, reason="CODI2_TEST_FDB_CLUSTER_FILE is not set: no FoundationDB server"),
]
API_VERSION = int(os.environ.get("CODI2_TEST_FDB_API_VERSION", "730"))


@pytest.fixture(scope="module")
def database() -> tuple[Any, Any]:
    """The loaded `fdb` module and an open `fdb.Database`."""
    from codi2.sinks.fdb import load_fdb

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
        from codi2.sinks.fdb import FdbSink

        fdb_module, db = database
        return FdbSink(db, fdb_module.FDBError, tenant_id=None, root=root)

    @pytest.fixture
    def reopen(self, database: tuple[Any, Any], root: tuple[str, ...]) -> Callable[[], Sink]:
        from codi2.sinks.fdb import FdbSink

        fdb_module, db = database
        return lambda: FdbSink(db, fdb_module.FDBError, tenant_id=None, root=root)


def test_versionstamps_order_batches_and_probe_works(database: tuple[Any, Any], root: tuple[str, ...]) -> None:
    from codi2.sinks.fdb import FdbSink

    fdb_module, db = database
    sink = FdbSink(db, fdb_module.FDBError, tenant_id="t1", root=root)
    for i in range(5):
        sink.write_batch(batch_of(*(make_event(f"{i}-{j}") for j in range(50))))
    assert [e.path for _, e in sink.read(EventQuery("t1"))] == [f"{i}-{j}" for i in range(5) for j in range(50)]
    sink.probe("t1")
    assert sink.cluster_status().get("client", {}).get("database_status", {}).get("available") is True
