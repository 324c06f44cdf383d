"""The event model and the trail fold, as pure logic (the batch window: tests/test_window.py)."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st
from sink_contract import make_event

from codi2.trail.events import EVENT_KEYS, Event, EventQuery, parse_time, rfc3339, uuid7
from codi2.trail.replay import Entry, fold


def test_uuid7_is_rfc9562_version_7_and_unique() -> None:
    ids = [uuid7() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", i) for i in ids)


def test_timestamps_are_rfc3339_utc_microseconds() -> None:
    assert rfc3339(1_700_000_000.5) == "2023-11-14T22:13:20.500000Z"
    assert parse_time("2023-11-14T22:13:20Z") == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert parse_time("2023-11-14T22:13:20").tzinfo is UTC


@given(st.binary(min_size=1, max_size=300).filter(lambda b: b"/" not in b and b"\0" not in b))
def test_any_file_name_round_trips_through_json(name: bytes) -> None:
    event = make_event(os.fsdecode(name))
    text = event.to_json()
    assert text.isascii() and "\n" not in text
    back = Event.from_json(text)
    assert back == event and os.fsencode(back.path) == name
    assert tuple(json.loads(text)) == EVENT_KEYS


def test_query_matches_dest_path_and_tenant_exactly() -> None:
    moved = make_event("a/x.py", action="moved", dest_path="b/y.py")
    assert EventQuery("t1", path_glob="b/*").matches(moved)
    assert not EventQuery("t1", path_glob="c/*").matches(moved)
    assert not EventQuery("t", path_glob="a/*").matches(moved)


def test_fold_follows_moves_and_directory_deletes() -> None:
    trail = [
        make_event("d", type="dir", sha256=None),
        make_event("d/a", sha256="1"),
        make_event("d/sub", type="dir", sha256=None),
        make_event("d/sub/b", sha256="2"),
        make_event("top", sha256="3"),
        make_event("d", action="moved", dest_path="e", type="dir", sha256=None),
        make_event("e/a", action="updated", sha256="4"),
        make_event("top", action="moved", dest_path="e/sub/b", sha256="3"),
        make_event("gone", sha256="5"),
        make_event("gone", action="deleted", sha256=None),
    ]
    state = fold(trail)
    root = "/workspace"
    assert state == {
        (root, "e"): Entry("dir", None),
        (root, "e/a"): Entry("file", "4"),
        (root, "e/sub"): Entry("dir", None),
        (root, "e/sub/b"): Entry("file", "3"),
    }
    assert fold([*trail, make_event("e", action="deleted", type="dir", sha256=None)]) == {}
