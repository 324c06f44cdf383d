"""The behaviour every sink must show. A backend's test module subclasses `SinkContract` and provides
a `sink` fixture (and `reopen`, which opens a second handle on the same store, and `tamper`, which edits
the store behind the sink's back as anyone with write access to it could)."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tamper import Tamper

from codi2.stores.base import Sink, StoredBatch
from codi2.trail import chain
from codi2.trail.chain import ChainHead, ChainKey, make_key
from codi2.trail.events import EVENT_KEYS, Batch, Event, EventQuery, encode_event, encode_events, rfc3339, uuid7
from codi2.trail.verify import Report, verify

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


def seal(events: Sequence[Event], head: ChainHead, stream: str, key: ChainKey | None = None) -> Batch:
    """A batch sealed into a stream's chain after `head`, as the journal seals it (just after its last event)."""
    records, ts = encode_events(events), max(e.ts for e in events)
    return Batch(uuid7(), tuple(events), chain.seal(stream, head, ts, records, len(events), key))


def chain_of(*batches: Sequence[Event], stream: str = "stream-1", key: ChainKey | None = None) -> list[Batch]:
    head, out = ChainHead(0, chain.ZERO), []
    for events in batches:
        out.append(seal(events, head, stream, key))
        head = ChainHead(out[-1].header.number, out[-1].header.link)  # type: ignore[union-attr]
    return out


# A property test whose examples each write a tenant of their own (so the function's store is fine), run by
# each backend's subclass.
EXAMPLES_OF_THEIR_OWN = (HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.differing_executors)
TAMPERINGS = {  # each, and what verify must name it (at least one of these)
    "delete_event": {"event_removed"},
    "alter": {"altered", "bad_link", "event_removed"},  # removed: an event moved to another tenant's keys
    "swap": {"reordered"},
    "remove_batch": {"missing_batch", "starts_mid_chain"},
    "insert_forged": {"inserted_batch", "unkeyed"},  # unkeyed: appended to a keyed trail without the key
    "unchained": {"unchained_event"},
    "rechain": {"unkeyed", "unknown_key"},
}
KEY = make_key(b"k" * 32)
OTHER_KEY = make_key(b"o" * 32)
NONE_FOR = {"session_id": "s-2", "dest_path": "elsewhere", "size": 7, "mode": 0o600, "sha256": "f" * 64}


def altered(event: Event, name: str) -> Event:
    """The event with one field changed, whatever its type."""
    value = getattr(event, name)
    if value is None:
        new: Any = NONE_FOR.get(name, "x")
    elif isinstance(value, int):
        new = value + 1
    else:
        new = value + "~"
    return event._replace(**{name: new})


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
            uid=2**32 - 2,
            gid=0,
            target=os.fsdecode(b"../caf\xe9\n"),
        )
        sink.write_batch(batch_of(odd))
        [back] = self._all(sink)
        assert back == odd
        assert os.fsencode(back.path) == b"dir/caf\xe9\nline.txt"
        assert os.fsencode(back.target or "") == b"../caf\xe9\n"

    def test_records_of_both_versions_are_kept_as_written_and_verify(self, sink: Sink) -> None:
        """A trail begun before events carried owners (version 1 records) goes on with version 2 ones, in
        one batch even: each is read back as it was, and the links over both still hold."""
        old = [make_event(f"old{i}") for i in range(2)]
        new = [make_event(f"new{i}", uid=1000, gid=1000) for i in range(2)]
        link = make_event("link", type="symlink", sha256=None, target="old0")
        for batch in chain_of(old, [make_event("old2"), new[0]], [new[1], link]):
            sink.write_batch(batch)
        assert [(e.uid, e.target) for e in self._all(sink)] == [(None, None)] * 3 + [(1000, None)] * 2 + [
            (None, "old0")
        ]
        assert [encode_event(e)[3] for e in self._all(sink)] == [1, 1, 1, 2, 2, 2]
        assert verify(sink, "t1").ok

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
        assert [e.path for e in self._all(sink, limit=0)] == []
        assert [e.path for e in self._all(sink, path_glob="src/*", limit=2)] == ["src/a.py", "src/b.py"]
        assert [e.path for e in self._all(sink, action="moved", limit=1)] == ["old.py"]  # the limit counts matches
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

    # The chain ---------------------------------------------------------------------------------------

    @pytest.fixture
    def tamper(self) -> Tamper:
        raise NotImplementedError

    def _stored(self, sink: Sink, tenant: str = "t1", stream: str = "stream-1") -> list[StoredBatch]:
        return list(sink.batches(tenant, stream))

    def test_chained_batches_are_read_back_by_stream_in_order(self, sink: Sink) -> None:
        one = chain_of([make_event("a0"), make_event("a1")], [make_event("a2")], [make_event("a3")], stream="s-a")
        two = chain_of([make_event("b0")], [make_event("b1"), make_event("b2")], stream="s-b")
        other = chain_of([make_event("c0", tenant="t2")], stream="s-c")
        for batch in [one[0], two[0], one[1], two[1], one[2], *other]:  # streams interleaved, as pods do
            sink.write_batch(batch)
        assert sorted(sink.streams("t1")) == ["s-a", "s-b"] and sink.streams("t2") == ["s-c"]
        assert sink.streams("t") == []
        cursors = {e.id: cursor for cursor, e in sink.read(EventQuery("t1"))}
        for stream, batches in (("s-a", one), ("s-b", two)):
            stored = self._stored(sink, stream=stream)
            assert [s.header for s in stored] == [b.header for b in batches]
            for s, b in zip(stored, batches, strict=True):
                rows = sink.batch_events("t1", s)
                assert [e for _, e in rows] == list(b.events)
                assert [c for c, _ in rows] == [cursors[e.id] for e in b.events]  # the cursors `read` gives

    def test_a_chained_batch_written_again_is_stored_once(self, sink: Sink) -> None:
        batches = chain_of([make_event("x"), make_event("y")], [make_event("z")])
        for batch in [*batches, *batches]:
            sink.write_batch(batch)
        assert [e.path for e in self._all(sink)] == ["x", "y", "z"]
        assert [s.header for s in self._stored(sink)] == [b.header for b in batches]
        assert verify(sink, "t1").ok

    def test_a_clean_trail_verifies(self, sink: Sink) -> None:
        for batch in chain_of(*([make_event(f"f{b}-{i}", ts=1.7e9 + b) for i in range(3)] for b in range(4))):
            sink.write_batch(batch)
        report = verify(sink, "t1")
        assert report.ok and report.breaks == 0 and report.trail_events == 12
        [stream] = report.streams
        assert (stream.batches, stream.checked, stream.events) == (4, 4, 12)
        assert (stream.first, stream.last) == (rfc3339(1.7e9), rfc3339(1.7e9 + 3))
        assert stream.head_batch == 4 and stream.key_ids == [None]
        assert stream.head_link == self._stored(sink)[-1].header.link.hex()

    def _trail(self, sink: Sink, tenant: str, batches: int, key: ChainKey | None = None) -> None:
        """A stream of `batches` batches of two events each, written."""
        events = ([make_event(f"{tenant}/{b}/{i}", tenant=tenant) for i in range(2)] for b in range(batches))
        for batch in chain_of(*events, key=key):
            sink.write_batch(batch)

    def _kinds(self, report: Report) -> set[str]:
        return {b.kind for s in report.streams for b in s.breaks} | {b.kind for b in report.unchained}

    def _delete_event(self, sink: Sink, tamper: Tamper, tenant: str, number: int, index: int) -> None:
        cursor, _ = sink.batch_events(tenant, self._stored(sink, tenant)[number - 1])[index]
        tamper.delete_event(tenant, cursor)

    def _alter(self, sink: Sink, tamper: Tamper, tenant: str, number: int, index: int, name: str) -> None:
        cursor, event = sink.batch_events(tenant, self._stored(sink, tenant)[number - 1])[index]
        tamper.put_event(tenant, cursor, altered(event, name))

    def _swap(self, sink: Sink, tamper: Tamper, tenant: str, a: int, b: int) -> None:
        stored = self._stored(sink, tenant)
        first, second = stored[a - 1], stored[b - 1]
        tamper.put_header(tenant, dataclasses.replace(second.header, number=a), second)
        tamper.put_header(tenant, dataclasses.replace(first.header, number=b), first)

    def _remove_batch(self, sink: Sink, tamper: Tamper, tenant: str, number: int) -> None:
        batch = self._stored(sink, tenant)[number - 1]
        for cursor, _ in sink.batch_events(tenant, batch):
            tamper.delete_event(tenant, cursor)
        tamper.delete_header(tenant, "stream-1", number)

    def _insert_forged(self, sink: Sink, tamper: Tamper, tenant: str, number: int) -> None:
        """A batch put in at `number`, the later ones renumbered, its link computed as the format says."""
        stored = self._stored(sink, tenant)
        for batch in reversed(stored[number - 1 :]):
            tamper.put_header(tenant, dataclasses.replace(batch.header, number=batch.header.number + 1), batch)
        tamper.delete_header(tenant, "stream-1", number)
        before = stored[number - 2].header if number > 1 else None
        head = ChainHead(before.number, before.link) if before else ChainHead(0, chain.ZERO)
        sink.write_batch(seal([make_event("forged", tenant=tenant)], head, "stream-1"))

    def _rechain(self, sink: Sink, tamper: Tamper, tenant: str, number: int, key: ChainKey | None) -> None:
        """Alter an event of batch `number`, then seal it and every later batch again with `key`."""
        self._alter(sink, tamper, tenant, number, 0, "path")
        stored = self._stored(sink, tenant)
        prev = stored[number - 2].header if number > 1 else None
        head = ChainHead(prev.number, prev.link) if prev else ChainHead(0, chain.ZERO)
        for batch in stored[number - 1 :]:
            events = [e for _, e in sink.batch_events(tenant, batch)]
            header = chain.seal("stream-1", head, batch.header.ts, encode_events(events), len(events), key)
            tamper.put_header(tenant, header, batch)
            head = ChainHead(header.number, header.link)

    def test_a_deleted_event_is_named(self, sink: Sink, tamper: Tamper) -> None:
        self._trail(sink, "t1", 3)
        self._delete_event(sink, tamper, "t1", 2, 1)
        report = verify(sink, "t1")
        assert not report.ok and [(b.kind, b.batch) for b in report.streams[0].breaks] == [("event_removed", 2)]

    @pytest.mark.parametrize("name", EVENT_KEYS)
    def test_altering_any_field_is_named(self, sink: Sink, tamper: Tamper, name: str) -> None:
        self._trail(sink, "t1", 3)
        self._alter(sink, tamper, "t1", 2, 0, name)
        breaks = [(b.kind, b.batch) for b in verify(sink, "t1").streams[0].breaks]
        # A store that keeps the tenant in its keys (FoundationDB) moves such an event to the other tenant.
        assert breaks == [("altered", 2)] or (name == "tenant_id" and breaks == [("event_removed", 2)])

    def test_two_batches_reordered_are_named(self, sink: Sink, tamper: Tamper) -> None:
        self._trail(sink, "t1", 4)
        self._swap(sink, tamper, "t1", 2, 3)
        assert ("reordered", 2) in {(b.kind, b.batch) for b in verify(sink, "t1").streams[0].breaks}

    def test_a_removed_batch_is_named(self, sink: Sink, tamper: Tamper) -> None:
        self._trail(sink, "t1", 4)
        self._remove_batch(sink, tamper, "t1", 2)
        [found] = verify(sink, "t1").streams[0].breaks
        assert (found.kind, found.batch) == ("missing_batch", 3) and "batch 2:" in found.detail
        self._remove_batch(sink, tamper, "t1", 1)
        assert [b.kind for b in verify(sink, "t1").streams[0].breaks] == ["starts_mid_chain"]

    def test_a_forged_batch_inserted_is_named(self, sink: Sink, tamper: Tamper) -> None:
        self._trail(sink, "t1", 4)
        self._insert_forged(sink, tamper, "t1", 3)
        breaks = verify(sink, "t1").streams[0].breaks
        assert ("inserted_batch", 3) in {(b.kind, b.batch) for b in breaks}
        assert {b.kind for b in breaks} == {"inserted_batch", "altered"}  # and the batches renumbered after it

    def test_an_event_in_no_batch_is_named(self, sink: Sink) -> None:
        self._trail(sink, "t1", 2)
        sink.write_batch(batch_of(make_event("slipped-in")))
        report = verify(sink, "t1")
        assert report.unchained_events == 1 and "'slipped-in'" in report.unchained[0].detail and not report.ok

    def test_a_keyed_trail_rechained_without_the_key_is_named(self, sink: Sink, tamper: Tamper) -> None:
        self._trail(sink, "t1", 4, KEY)
        assert verify(sink, "t1", [KEY]).ok
        assert {b.kind for b in verify(sink, "t1").streams[0].breaks} == {"unknown_key"}  # no key, no check
        self._rechain(sink, tamper, "t1", 2, None)  # what anyone who can write the store can do
        report = verify(sink, "t1", [KEY])
        assert [(b.kind, b.batch) for b in report.streams[0].breaks] == [("unkeyed", 2)]
        self._rechain(sink, tamper, "t1", 2, ChainKey(KEY.id, b"a guess at the key......" * 2))
        report = verify(sink, "t1", [KEY])
        assert [(b.kind, b.batch) for b in report.streams[0].breaks] == [("bad_link", n) for n in (2, 3, 4)]

    def test_an_unkeyed_trail_rechained_verifies_which_is_why_the_key_exists(self, sink: Sink, tamper: Tamper) -> None:
        self._trail(sink, "t2", 3)
        self._rechain(sink, tamper, "t2", 2, None)
        assert verify(sink, "t2").ok

    def test_since_checks_each_stream_from_its_first_batch_journaled_then(self, sink: Sink, tamper: Tamper) -> None:
        for batch in chain_of(*([make_event(f"f{b}-{i}", ts=1.7e9 + b) for i in range(2)] for b in range(4))):
            sink.write_batch(batch)
        self._delete_event(sink, tamper, "t1", 2, 0)
        since = datetime.fromtimestamp(1.7e9 + 2, UTC)
        report = verify(sink, "t1", since=since)
        assert report.ok and report.trail_events == 4
        assert (report.streams[0].batches, report.streams[0].checked) == (4, 2)
        assert not verify(sink, "t1").ok
        self._remove_batch(sink, tamper, "t1", 1)  # the headers before it are still judged
        assert [b.kind for b in verify(sink, "t1", since=since).streams[0].breaks] == ["starts_mid_chain"]

    def test_a_rotated_key_needs_both_keys(self, sink: Sink) -> None:
        first = chain_of([make_event("a")], [make_event("b")], key=KEY)
        last = first[-1].header
        rotated = seal([make_event("c")], ChainHead(last.number, last.link), "stream-1", OTHER_KEY)  # type: ignore[union-attr]
        for batch in [*first, rotated]:
            sink.write_batch(batch)
        assert verify(sink, "t1", [KEY, OTHER_KEY]).ok
        assert verify(sink, "t1", [KEY, OTHER_KEY]).streams[0].key_ids == [KEY.id, OTHER_KEY.id]
        [found] = verify(sink, "t1", [KEY]).streams[0].breaks
        assert (found.kind, found.batch) == ("unknown_key", 3) and OTHER_KEY.id in found.detail

    @settings(max_examples=40, suppress_health_check=EXAMPLES_OF_THEIR_OWN)
    @given(st.data())
    def test_every_random_tampering_is_found(self, sink: Sink, tamper: Tamper, data: st.DataObject) -> None:
        tenant = f"p-{uuid7()}"  # each example a trail of its own
        count = data.draw(st.integers(3, 6), label="batches")
        keyed = data.draw(st.booleans(), label="keyed")
        self._trail(sink, tenant, count, KEY if keyed else None)
        keys = [KEY] if keyed else []
        assert verify(sink, tenant, keys).ok
        kinds = sorted(TAMPERINGS.keys() - (set() if keyed else {"rechain"}))
        kind = data.draw(st.sampled_from(kinds), label="tampering")
        number = data.draw(st.integers(1, count), label="batch")
        if kind == "delete_event":
            self._delete_event(sink, tamper, tenant, number, data.draw(st.integers(0, 1)))
        elif kind == "alter":
            index, name = data.draw(st.integers(0, 1)), data.draw(st.sampled_from(EVENT_KEYS), label="field")
            self._alter(sink, tamper, tenant, number, index, name)
        elif kind == "swap":
            other = data.draw(st.integers(1, count).filter(lambda n: n != number), label="with")
            self._swap(sink, tamper, tenant, number, other)
        elif kind == "remove_batch":  # a stream's tail cut off shows only against its head (/status)
            self._remove_batch(sink, tamper, tenant, min(number, count - 1))
        elif kind == "insert_forged":  # appended last, a forged batch is a valid extension unless keyed
            self._insert_forged(sink, tamper, tenant, data.draw(st.integers(1, count + keyed), label="at"))
        elif kind == "unchained":
            sink.write_batch(batch_of(make_event("slipped-in", tenant=tenant)))
        else:
            self._rechain(sink, tamper, tenant, number, data.draw(st.sampled_from([None, OTHER_KEY])))
        report = verify(sink, tenant, keys)
        assert not report.ok and self._kinds(report) & TAMPERINGS[kind]
