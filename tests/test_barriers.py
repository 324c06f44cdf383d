"""The barrier ring, in process: which event ends which barrier, lost and late ones, waiting.

No inotify here: the test plays the kernel, handing `passed` the events a watch on the ring's directory
would deliver. The files are real (a barrier is a `utime` on one).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from codi2.watch.barriers import BARRIER_MASK, RING, Barriers
from codi2.watch.inotify import IN


@pytest.fixture
def barriers(tmp_path: Path) -> Barriers:
    b = Barriers(tmp_path / "state" / "barrier")
    watched: list[tuple[bytes, int]] = []
    b.arm(lambda path, mask: watched.append((path, mask)) or 7)
    assert watched == [(os.fsencode(tmp_path / "state" / "barrier"), BARRIER_MASK)]
    assert b.wd == 7
    return b


def event(seq: int) -> tuple[int, bytes]:
    """The event the kernel queues for barrier `seq` (its ring file's attributes changed)."""
    return IN.IN_ATTRIB, b"b%d" % (seq % RING)


def test_a_barrier_touches_the_next_file_of_the_ring(barriers: Barriers, tmp_path: Path) -> None:
    ring = tmp_path / "state" / "barrier"
    for f in ring.iterdir():
        os.utime(f, (0, 0))
    seqs = [barriers.request() for _ in range(RING)]
    assert seqs == [1, 2, 3, 4]
    assert all(f.stat().st_mtime > 0 for f in ring.iterdir())  # each file touched once: never merged
    assert sorted(f.name for f in ring.iterdir()) == [f"b{i}" for i in range(RING)]


def test_each_event_ends_its_barrier_and_waiters_see_it(barriers: Barriers) -> None:
    first, second = barriers.request(), barriers.request()
    assert first is not None and second is not None
    assert not barriers.wait(first, 0)
    assert barriers.passed(*event(first)) == first
    assert barriers.wait(first, 0) and not barriers.wait(second, 0)
    assert barriers.passed(*event(second)) == second
    assert barriers.wait(second, 0)


def test_barriers_lost_to_an_overflow_are_skipped_and_late_events_are_stale(barriers: Barriers) -> None:
    seqs = [barriers.request() for _ in range(3)]
    assert seqs == [1, 2, 3]
    assert barriers.passed(*event(3)) == 3  # the events of 1 and 2 were dropped with the queue
    assert barriers.wait(1, 0) and barriers.wait(2, 0)
    assert barriers.passed(*event(1)) is None  # nothing outstanding: a late event counts for nothing


def test_only_attribute_changes_of_ring_files_are_barriers(barriers: Barriers) -> None:
    seq = barriers.request()
    assert seq is not None
    assert barriers.passed(IN.IN_CREATE, b"b1") is None
    assert barriers.passed(IN.IN_ATTRIB, b"journal.db") is None
    assert barriers.passed(IN.IN_ATTRIB, b"bx") is None
    assert not barriers.wait(seq, 0)
    assert barriers.passed(*event(seq)) == seq


def test_settle_all_counts_every_requested_barrier_as_seen(barriers: Barriers) -> None:
    seqs = [barriers.request() for _ in range(5)]
    barriers.settle_all()
    assert all(s is not None and barriers.wait(s, 0) for s in seqs)
    assert barriers.passed(*event(5)) is None  # their own events, should they come, are stale
    later = barriers.request()
    assert later == 6 and barriers.passed(*event(later)) == later


def test_wake_lets_a_waiter_return(barriers: Barriers) -> None:
    seq = barriers.request()
    assert seq is not None
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(barriers.wait(seq, 30)))
    waiter.start()
    assert barriers.passed(*event(seq)) == seq
    barriers.wake()
    waiter.join(30)
    assert result == [True]


def test_without_a_watch_there_are_no_barriers(tmp_path: Path) -> None:
    b = Barriers(tmp_path / "barrier")
    b.arm(lambda path, mask: -1)
    assert b.wd is None and b.request() is None


def test_without_its_directory_there_are_no_barriers(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    b = Barriers(tmp_path / "file" / "barrier")
    b.arm(lambda path, mask: pytest.fail("nothing to watch"))
    assert b.wd is None and b.request() is None


def test_a_failed_touch_is_no_barrier(barriers: Barriers, tmp_path: Path) -> None:
    for f in (tmp_path / "state" / "barrier").iterdir():
        f.unlink()
    assert barriers.request() is None
    assert barriers.passed(*event(1)) is None  # nothing was counted as requested
