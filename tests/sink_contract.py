"""The behaviour every sink must show. A backend's test module subclasses `SinkContract` and provides
a `sink` fixture (and `reopen`, which opens a second handle on the same store)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from codi2.events import Batch, Event, EventQuery, rfc3339, uuid7
from codi2.sinks import Sink

_seq = itertools.count(1)


def make_event(path: str = "a.txt", *, tenant: str = "t1", action: str = "created", ts: float = 1.7e9, **kw) -> Event:
    fields = {
        "id": uuid7(),
        "seq": next(_seq),
        "ts": rfc3339(ts),
        "tenant_id": tenant,
        "user_id": "u1",
        "session_id": None,
        "pod": "pod-1",
        "action": action,
        "path": path,
        "dest_path": None,
        "root": "/workspace",
        "type": "file",
        "size": 3,
        "mode": 0o644,
        "mtime": rfc3339(ts),
        "sha256": "0" * 64,
    }
    fields.update(kw)
    return Event(**fields)


def batch_of(*events: Event) -> Batch:
    return Batch(uuid7(), tuple(events))


class SinkContract:
    @pytest.fixture
    def sink(self) -> Sink:
        raise NotImplementedError

    @pytest.fixture
    def reopen(self) -> Callable[[], Sink]:
        raise NotImplementedError

    def _all(self, sink: Sink, tenant: str = "t1", **kw) -> list[Event]:
        return [e for _, e in sink.read(EventQuery(tenant, **kw))]

    def test_write_and_read_back_in_commit_order(self, sink: Sink) -> None:
        first = [make_event(f"f{i}") for i in range(5)]
        second = [make_event(f"g{i}") for i in range(3)]
        sink.write_batch(batch_of(*first))
        sink.write_batch(batch_of(*second))
        assert self._all(sink) == first + second

    def test_events_round_trip_exactly(self, sink: Sink) -> None:
        odd = make_event(
            os.fsdecode(b"dir/caf\xe9\nline.txt"),
            action="moved",
            dest_path="dir/\u00e9t\u00e9 \u2603.txt",
            session_id="s-9",
            type="symlink",
            size=None,
            sha256=None,
        )
        sink.write_batch(batch_of(odd))
        [back] = self._all(sink)
        assert back == odd
        assert os.fsencode(back.path) == b"dir/caf\xe9\nline.txt"

    def test_rewriting_a_batch_is_idempotent(self, sink: Sink) -> None:
        batch = batch_of(make_event("x"), make_event("y"))
        sink.write_batch(batch)
        sink.write_batch(batch)
        sink.write_batch(Batch(uuid7(), batch.events))  # same events replayed under a new batch id
        assert [e.path for e in self._all(sink)] == ["x", "y"]

    def test_the_same_event_twice_in_one_batch_is_stored_once(self, sink: Sink) -> None:
        twice = make_event("twice")
        sink.write_batch(batch_of(twice, make_event("other"), twice))
        assert [e.path for e in self._all(sink)] == ["twice", "other"]

    def test_tenants_never_see_each_other(self, sink: Sink) -> None:
        sink.write_batch(batch_of(make_event("mine", tenant="t1"), make_event("theirs", tenant="t10")))
        assert [e.path for e in self._all(sink, "t1")] == ["mine"]
        assert [e.path for e in self._all(sink, "t10")] == ["theirs"]
        assert self._all(sink, "t") == []

    def test_filters(self, sink: Sink) -> None:
        sink.write_batch(
            batch_of(
                make_event("src/a.py", ts=1_700_000_000),
                make_event("src/b.py", action="updated", ts=1_700_000_100),
                make_event("docs/c.md", action="deleted", ts=1_700_000_200),
                make_event("old.py", action="moved", dest_path="src/new.py", ts=1_700_000_300),
            )
        )
        assert [e.path for e in self._all(sink, path_glob="src/*")] == ["src/a.py", "src/b.py", "old.py"]
        assert [e.path for e in self._all(sink, action="deleted")] == ["docs/c.md"]
        since = datetime.fromtimestamp(1_700_000_100, UTC)
        assert [e.path for e in self._all(sink, since=since)] == ["src/b.py", "docs/c.md", "old.py"]
        assert [e.path for e in self._all(sink, limit=2)] == ["src/a.py", "src/b.py"]
        assert [e.path for e in self._all(sink, path_glob="*.py", action="updated")] == ["src/b.py"]

    def test_follow_resumes_after_cursor(self, sink: Sink, reopen: Callable[[], Sink]) -> None:
        sink.write_batch(batch_of(make_event("one"), make_event("two")))
        reader = reopen()
        try:
            seen = list(reader.read(EventQuery("t1")))
            assert [e.path for _, e in seen] == ["one", "two"]
            last = seen[-1][0]
            assert list(reader.read(EventQuery("t1"), after=last)) == []
            sink.write_batch(batch_of(make_event("three")))
            assert [e.path for _, e in reader.read(EventQuery("t1"), after=last)] == ["three"]
        finally:
            reader.close()

    def test_a_cursor_never_leads_into_another_tenant(self, sink: Sink) -> None:
        sink.write_batch(batch_of(make_event("a1", tenant="a"), make_event("a2", tenant="a")))
        sink.write_batch(batch_of(make_event("b1", tenant="b")))
        after_a1 = next(iter(sink.read(EventQuery("a"))))[0]
        after_b1 = next(iter(sink.read(EventQuery("b"))))[0]
        assert [e.path for _, e in sink.read(EventQuery("b"), after=after_a1)] == ["b1"]
        assert list(sink.read(EventQuery("a"), after=after_b1)) == []

    def test_ping_succeeds_on_a_healthy_store(self, sink: Sink) -> None:
        sink.ping()
