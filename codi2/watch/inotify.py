"""The kernel side of watching: one inotify instance, its watches, and the reader thread that drains it.

This is the ONLY module that touches `watchdog.observers.inotify_c`, which is not part of watchdog's
documented API (hence the exact pin in pyproject.toml): `inotify_init`, `inotify_add_watch`,
`inotify_rm_watch` and the mask constants. Should watchdog move or rename them, the import below fails
and tests/test_inotify.py says which name went missing; nothing else needs to change. Events are read
and decoded here (`struct inotify_event`, a stable kernel ABI), not by watchdog.

The reader drains the kernel queue in 1 MiB reads into a bounded backlog, so a burst waits in memory
instead of overflowing the kernel's 16k-event queue. The backlog is also the handler thread's inbox:
requests to run code in that thread queue up there, in order with the events.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

import structlog
from watchdog.observers.inotify_c import InotifyConstants as _C
from watchdog.observers.inotify_c import WatchDescriptor, inotify_add_watch, inotify_init, inotify_rm_watch

log = structlog.get_logger("codi2.watch.inotify")


class IN:
    """The inotify(7) mask bits codi2 uses, under their kernel names."""

    IN_MODIFY: Final[int] = _C.IN_MODIFY
    IN_ATTRIB: Final[int] = _C.IN_ATTRIB
    IN_CLOSE_WRITE: Final[int] = _C.IN_CLOSE_WRITE
    IN_MOVED_FROM: Final[int] = _C.IN_MOVED_FROM
    IN_MOVED_TO: Final[int] = _C.IN_MOVED_TO
    IN_CREATE: Final[int] = _C.IN_CREATE
    IN_DELETE: Final[int] = _C.IN_DELETE
    IN_DELETE_SELF: Final[int] = _C.IN_DELETE_SELF
    IN_MOVE_SELF: Final[int] = _C.IN_MOVE_SELF
    IN_UNMOUNT: Final[int] = _C.IN_UNMOUNT
    IN_Q_OVERFLOW: Final[int] = _C.IN_Q_OVERFLOW
    IN_IGNORED: Final[int] = _C.IN_IGNORED
    IN_ONLYDIR: Final[int] = _C.IN_ONLYDIR
    IN_EXCL_UNLINK: Final[int] = _C.IN_EXCL_UNLINK
    IN_ISDIR: Final[int] = _C.IN_ISDIR


RawEvent = tuple[int, int, int, bytes]  # wd, mask, cookie, name (b"" for the watched directory itself)
Request = Callable[[], None]  # code to run in the handler thread, in order with the events
Item = list[RawEvent] | Request

READ_BUFFER_BYTES = 1 << 20  # drains a full default kernel queue (16,384 events) in one read
MAX_BACKLOG_EVENTS = 1 << 18
GATHER_EVENTS = 512
GATHER_S = 0.002
SMALL_READ_BYTES = 4096
EVENT = struct.Struct("iIII")  # struct inotify_event without its name: wd, mask, cookie, len


def parse_events(buf: bytes) -> list[RawEvent]:
    """The events of one read, in kernel order; a name is stripped of its NUL padding."""
    out = []
    i, end = 0, len(buf)
    unpack = EVENT.unpack_from
    while i + 16 <= end:
        wd, mask, cookie, length = unpack(buf, i)
        out.append((wd, mask, cookie, buf[i + 16 : i + 16 + length].rstrip(b"\0")))
        i += 16 + length
    return out


class Backlog:
    """Raw events read from the kernel and not yet handled, plus requests for the handler. Bounded: when
    full, reading stops and the kernel queue is the next buffer (its overflow is detected and recovered
    by a recrawl). Requests never wait for room: the handler may be the one asking."""

    def __init__(self, max_events: int) -> None:
        self._items: deque[Item] = deque()
        self._count = 0
        self._max = max_events
        self._cond = threading.Condition()
        self._closed = False
        self.high_water = 0

    def put(self, item: Item, size: int = 1, *, wait: bool = True) -> None:
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: self._count < self._max or self._closed)
            was_empty = not self._items
            self._items.append(item)
            self._count += size
            self.high_water = max(self.high_water, self._count)
            if was_empty:  # the handler only ever waits on an empty backlog
                self._cond.notify_all()

    def take(self) -> list[Item] | None:
        """Everything pending, in order; None once closed. Woken by a few events, it lets a burst gather
        for a moment first: handing events over one read at a time costs more than handling them."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._items) or self._closed)
            if not self._closed and self._count < GATHER_EVENTS:
                self._cond.wait(GATHER_S)
            if self._closed:
                return None
            items = list(self._items)
            self._items.clear()
            self._count = 0
            self._cond.notify_all()
            return items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Inotify:
    """One inotify instance: watches are added and removed by the handler thread; the reader thread
    (`start`) is the only one that reads, and hands what it read to `backlog`."""

    def __init__(self, max_backlog: int = MAX_BACKLOG_EVENTS) -> None:
        self.fd: int | None = None
        self.backlog = Backlog(max_backlog)
        self._reader: threading.Thread | None = None
        self._stopping = False

    def open(self) -> None:
        """Raises OSError naming both limits a failed inotify_init may have met."""
        fd = inotify_init()
        if fd < 0:
            raise OSError(
                errno.EMFILE,
                "cannot create an inotify instance: raise fs.inotify.max_user_instances, or the open-file limit"
                " (nofile)",
            )
        os.set_inheritable(fd, False)
        self.fd = fd

    def watch(self, path: bytes, mask: int) -> int:
        """A watch descriptor for `path`; -errno on failure."""
        assert self.fd is not None
        wd = inotify_add_watch(self.fd, path, mask)
        return wd if wd >= 0 else -(ctypes.get_errno() or errno.EIO)

    def watch_fd(self, fd: int, mask: int) -> int:
        """A watch on exactly the directory `fd` refers to (through its /proc/self/fd magic link, which
        reaches what was opened however the path has changed since); -errno on failure."""
        return self.watch(b"/proc/self/fd/%d" % fd, mask)

    def unwatch(self, wd: int) -> None:
        assert self.fd is not None
        inotify_rm_watch(self.fd, WatchDescriptor(wd))

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read_loop, name="codi2-inotify-read", daemon=True)
        self._reader.start()

    @property
    def started(self) -> bool:
        return self._reader is not None

    def is_reading(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def stop(self) -> None:
        """Stop at the next read (an event has to wake a blocked one) and close the backlog."""
        self._stopping = True
        self.backlog.close()

    def join(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)

    def close(self) -> None:
        # A reader still blocked in read() keeps the descriptor: closing it under the thread could hand
        # the number to another file. It only happens when nothing woke the reader; the process ends.
        if self.fd is not None and not self.is_reading():
            os.close(self.fd)
            self.fd = None

    def _read_loop(self) -> None:
        assert self.fd is not None
        try:
            while not self._stopping:
                try:
                    buf = os.read(self.fd, READ_BUFFER_BYTES)
                except InterruptedError:
                    continue
                events = parse_events(buf)
                if events:
                    self.backlog.put(events, len(events))
                if len(buf) < SMALL_READ_BYTES:
                    # A writer makes events one at a time; waking for each costs more than the event.
                    # Let a few gather in the kernel's queue (which holds 16k) before the next read.
                    time.sleep(GATHER_S)
        except OSError as exc:
            if not self._stopping:
                log.error("inotify_read_failed", error=str(exc))
        finally:
            self.backlog.close()
