"""The mount table, watched: a mount that appears or goes inside a root changes what its path shows, and
inotify says nothing of it.

A file system mounted over a watched directory hides it without an event: the watch stays on the covered
directory, which no path reaches any more, and the mount's own contents have no watch. An unmount
uncovers it likewise. Linux signals every change of the mount namespace on `/proc/self/mountinfo`:
poll() finds it readable-exceptional (POLLPRI). One thread waits for that, reads the table again and
hands the mount points that appeared or went to `on_change`. The same thread keeps the watcher's clock:
`on_tick` every `tick_s`, for the periodic check of the roots.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("codi2.watch.mounts")

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mount_points(table: bytes) -> set[tuple[bytes, bytes]]:
    """(mount id, mount point) of each line of a mountinfo table. The kernel escapes space, tab, newline
    and backslash in a mount point as three octal digits (`\\040`)."""
    out = set()
    for line in table.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            out.add((fields[0], _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])))
    return out


class MountWatch:
    """The thread that reads the mount table when it changes, and ticks."""

    def __init__(self, on_change: Callable[[list[bytes]], None], on_tick: Callable[[], None], tick_s: float) -> None:
        self._on_change = on_change
        self._on_tick = on_tick
        self._tick_s = tick_s
        self._fd: int | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._table: set[tuple[bytes, bytes]] = set()

    def start(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        try:
            self._fd = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
            self._table = mount_points(self._read())
        except OSError as exc:
            self._fd = None
            log.warning("mount_table_unavailable", error=exc.strerror, note="mounts inside the roots go unnoticed")
        self._thread = threading.Thread(target=self._loop, name="codi2-mounts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Wake the thread and wait for it; its descriptors stay open if it does not end in time."""
        if self._thread is None:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        if not self._thread.is_alive():
            for fd in (self._fd, self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
        self._thread = self._fd = None

    def _read(self) -> bytes:
        assert self._fd is not None
        chunks = []
        os.lseek(self._fd, 0, os.SEEK_SET)
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._fd is not None:
            poller.register(self._fd, select.POLLPRI)
        next_tick = time.monotonic() + self._tick_s
        while not self._stopping:
            ready = poller.poll(max(0.0, next_tick - time.monotonic()) * 1000)
            try:
                if any(fd == self._fd for fd, _ in ready):
                    self._changed()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick_s
                    self._on_tick()
            except Exception:  # the next change, or tick, tries again
                log.exception("mount_watch_failed")

    def _changed(self) -> None:
        table = mount_points(self._read())
        changed = {point for _, point in table ^ self._table}
        self._table = table
        if changed:
            self._on_change(sorted(changed))
