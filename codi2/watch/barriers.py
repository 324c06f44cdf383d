"""Barriers: a mark placed in the kernel's event queue, to know when everything queued before it was read.

As Watchman's cookies (CookieSync): touch a file in a watched directory of our own and wait for its
event. The kernel queues events in order, so when the handler reads the barrier's event it has read
every change made before the touch. The watcher uses them to act once a read is complete (a rename's
partner may sit in the next read; a suspect directory is recrawled only after all that was queued about
it), and `Watcher.barrier()` to wait until what happened before the call has been handed on.

Barriers are `utime` calls: they need no free disk space, so they keep working when the disk is full.
Consecutive barriers touch different files of a ring, so the kernel never merges two of their events.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import structlog

from codi2.watch.inotify import IN

log = structlog.get_logger("codi2.watch.barriers")

BARRIER_MASK = IN.IN_ATTRIB | IN.IN_ONLYDIR
RING = 4


class Barriers:
    """The ring of barrier files. `request` may be called from any thread; `passed`, `settle_all` and
    `wake` only from the one that reads the events."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self.wd: int | None = None  # the watch on the directory; None while barriers are unavailable
        self._files: list[bytes] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._requested = 0
        self._seen = 0
        self._outstanding: deque[int] = deque()  # requested barriers whose event has not been read

    def arm(self, watch: Callable[[bytes, int], int]) -> None:
        """Create the ring's files and watch their directory (`watch` returns a wd, negative on failure).
        Without them barriers are unavailable: `request` returns None and callers act at once."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            base = os.fsencode(self._dir)
            files = [os.path.join(base, b"b%d" % i) for i in range(RING)]
            for path in files:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            log.error("barrier_unavailable", path=str(self._dir), error=exc.strerror)
            return
        wd = watch(base, BARRIER_MASK)
        if wd < 0:
            log.error("barrier_unavailable", path=str(self._dir), error="cannot watch it")
            return
        self._files = files
        self.wd = wd

    def request(self) -> int | None:
        """Touch the next barrier file: its event marks this point of the kernel queue. Returns the
        barrier's number, or None if that failed; then callers act at once (a little early beats never)."""
        if self.wd is None:
            return None
        with self._lock:
            seq = self._requested + 1
            try:
                os.utime(self._files[seq % RING])
            except OSError as exc:
                log.warning("barrier_failed", error=exc.strerror)
                return None
            self._requested = seq
            self._outstanding.append(seq)
            return seq

    def passed(self, mask: int, name: bytes) -> int | None:
        """The barrier an event on the barrier directory ends (it now counts as seen; `wake` its waiters
        once it is acted on), or None: not a barrier file, or a late event of a barrier already counted.
        Barriers whose events were lost to a queue overflow are skipped."""
        if not (mask & IN.IN_ATTRIB and name[:1] == b"b" and name[1:].isdigit()):
            return None
        ring = int(name[1:])
        with self._lock:
            while self._outstanding and self._outstanding[0] % RING != ring:
                self._outstanding.popleft()
            if not self._outstanding:
                return None
            self._seen = self._outstanding.popleft()
            return self._seen

    def settle_all(self) -> None:
        """Count every barrier requested so far as seen: after a full recrawl, nothing they marked is
        left to read, and some of their own events may have been lost with the rest."""
        with self._lock:
            self._seen = self._requested
            self._outstanding.clear()

    def wake(self) -> None:
        """Let the waiters whose barrier has been seen return."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, seq: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._seen >= seq, timeout)
