"""watchdog's low-level inotify calls, which codi2/watch/inotify.py alone uses, checked against a real kernel.

`watchdog.observers.inotify_c` is not part of watchdog's documented API, so an upgrade may move or
rename what codi2 uses. Every test here first checks that contract and fails with one message naming what
went missing, instead of an ImportError deep in the daemon. The calls are then exercised for real: a
watch on a temp dir, a write, the event read back and decoded, the watch removed.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import select
import threading
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

WATCHDOG_MODULE = "watchdog.observers.inotify_c"
# name -> (argtypes, restype) of the ctypes function codi2 calls.
CALLS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "inotify_init": ((), ctypes.c_int),
    "inotify_add_watch": ((ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32), ctypes.c_int),
    "inotify_rm_watch": ((ctypes.c_int, ctypes.c_uint32), ctypes.c_int),
}
# The kernel ABI (<sys/inotify.h>): what the mask bits must be, whoever spells them.
KERNEL = {
    "IN_MODIFY": 0x00000002,
    "IN_ATTRIB": 0x00000004,
    "IN_CLOSE_WRITE": 0x00000008,
    "IN_MOVED_FROM": 0x00000040,
    "IN_MOVED_TO": 0x00000080,
    "IN_CREATE": 0x00000100,
    "IN_DELETE": 0x00000200,
    "IN_DELETE_SELF": 0x00000400,
    "IN_MOVE_SELF": 0x00000800,
    "IN_UNMOUNT": 0x00002000,
    "IN_Q_OVERFLOW": 0x00004000,
    "IN_IGNORED": 0x00008000,
    "IN_ONLYDIR": 0x01000000,
    "IN_EXCL_UNLINK": 0x04000000,
    "IN_ISDIR": 0x40000000,
}


def watchdog_contract() -> list[str]:
    """Everything codi2 needs from watchdog's inotify_c that is missing or changed (empty when all holds)."""
    try:
        mod: ModuleType = importlib.import_module(WATCHDOG_MODULE)
    except ImportError as exc:
        return [f"module {WATCHDOG_MODULE} cannot be imported ({exc})"]
    problems = []
    for name, (argtypes, restype) in CALLS.items():
        fn = getattr(mod, name, None)
        if fn is None:
            problems.append(f"{name} is gone")
            continue
        if tuple(getattr(fn, "argtypes", None) or ()) != argtypes or getattr(fn, "restype", None) is not restype:
            problems.append(f"{name} is no longer a C function {restype.__name__}({argtypes})")
        elif not getattr(fn, "_flags_", 0) & ctypes._FUNCFLAG_USE_ERRNO:
            problems.append(f"{name} no longer saves errno (use_errno): failed watches would lose their reason")
    if not hasattr(mod, "WatchDescriptor"):
        problems.append("WatchDescriptor is gone")
    constants = getattr(mod, "InotifyConstants", None)
    if constants is None:
        problems.append("InotifyConstants is gone")
    else:
        for name, value in KERNEL.items():
            got = getattr(constants, name, None)
            if got != value:
                problems.append(f"InotifyConstants.{name} is {got!r}, the kernel's is {value:#x}")
    return problems


def require_contract() -> None:
    problems = watchdog_contract()
    if problems:
        pytest.fail(
            f"watchdog {version('watchdog')} changed the undocumented low-level API codi2 uses "
            f"({WATCHDOG_MODULE}): " + "; ".join(problems) + ". Port codi2/watch/inotify.py (the only module "
            "that imports it) or pin watchdog back in pyproject.toml and constraints.txt.",
            pytrace=False,
        )


@pytest.fixture
def inotify() -> ModuleType:
    require_contract()
    return importlib.import_module("codi2.watch.inotify")


def read_events(inotify: ModuleType, fd: int, until: int) -> list[tuple[int, int, int, bytes]]:
    """Events read from `fd` until one has a mask bit of `until` (each read waits 10 s at most)."""
    out: list[tuple[int, int, int, bytes]] = []
    while not any(mask & until for _, mask, _, _ in out):
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, f"no inotify event within 10 s; got {out}"
        out += inotify.parse_events(os.read(fd, inotify.READ_BUFFER_BYTES))
    return out


def test_watchdog_still_provides_the_calls_codi2_uses() -> None:
    require_contract()


def test_the_calls_watch_a_real_directory(inotify: ModuleType, tmp_path: Path) -> None:
    """Straight through watchdog's functions: init, add a watch, a write read back, remove the watch."""
    IN, wdog = inotify.IN, importlib.import_module(WATCHDOG_MODULE)
    fd = wdog.inotify_init()
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        wd = wdog.inotify_add_watch(fd, os.fsencode(tmp_path), IN.IN_CREATE | IN.IN_CLOSE_WRITE | IN.IN_ONLYDIR)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        (tmp_path / "caf\xe9.txt").write_text("x")
        events = read_events(inotify, fd, IN.IN_CLOSE_WRITE)
        assert (wd, IN.IN_CREATE, 0, "café.txt".encode()) in events
        assert (wd, IN.IN_CLOSE_WRITE, 0, "café.txt".encode()) in events
        assert wdog.inotify_rm_watch(fd, wd) == 0
        assert (wd, IN.IN_IGNORED, 0, b"") in read_events(inotify, fd, IN.IN_IGNORED)
    finally:
        os.close(fd)


def test_a_failed_watch_says_why(inotify: ModuleType, tmp_path: Path) -> None:
    """`Inotify.watch` returns -errno, read through ctypes' saved errno (watchdog's use_errno)."""
    (tmp_path / "file").write_text("x")
    ino = inotify.Inotify()
    ino.open()
    try:
        assert ino.watch(os.fsencode(tmp_path / "missing"), inotify.IN.IN_CREATE) == -errno.ENOENT
        assert ino.watch(os.fsencode(tmp_path / "file"), inotify.IN.IN_ONLYDIR) == -errno.ENOTDIR
    finally:
        ino.close()


@pytest.fixture
def reading(inotify: ModuleType, tmp_path: Path) -> Iterator[Any]:
    ino = inotify.Inotify()
    ino.open()
    ino.start()
    yield ino
    ino.stop()
    (tmp_path / "wake").touch()  # a blocked read returns only with an event
    ino.join(10)
    assert not ino.is_reading()
    fd = ino.fd
    ino.close()
    assert ino.fd is None
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_the_reader_hands_events_to_the_backlog_in_kernel_order(
    inotify: ModuleType, reading: Any, tmp_path: Path
) -> None:
    IN = inotify.IN
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        wd = reading.watch_fd(dfd, IN.IN_CREATE | IN.IN_MOVED_FROM | IN.IN_MOVED_TO | IN.IN_ONLYDIR)
    finally:
        os.close(dfd)
    assert wd >= 0, os.strerror(-wd)
    (tmp_path / "d").mkdir()
    (tmp_path / "d").rename(tmp_path / "e")
    events: list[tuple[int, int, int, bytes]] = []
    while not any(mask & IN.IN_MOVED_TO for _, mask, _, _ in events):
        items = reading.backlog.take()
        assert items is not None, "the reader stopped"
        events += [event for item in items for event in item]
    create, moved_from, moved_to = events[:3]
    assert create == (wd, IN.IN_CREATE | IN.IN_ISDIR, 0, b"d")
    assert moved_from[:2] == (wd, IN.IN_MOVED_FROM | IN.IN_ISDIR) and moved_from[3] == b"d"
    assert moved_to[:2] == (wd, IN.IN_MOVED_TO | IN.IN_ISDIR) and moved_to[3] == b"e"
    assert moved_from[2] == moved_to[2] != 0  # the cookie pairs a rename


def test_requests_queue_in_order_with_events_and_never_wait_for_room(inotify: ModuleType) -> None:
    backlog = inotify.Backlog(max_events=2)
    backlog.put([(1, 2, 0, b"a"), (1, 2, 0, b"b")], 2)

    def request() -> None:
        pass

    backlog.put(request, wait=False)  # the backlog is full: a request goes in all the same
    assert backlog.high_water == 3
    assert backlog.take() == [[(1, 2, 0, b"a"), (1, 2, 0, b"b")], request]
    done = threading.Event()

    def close_later() -> None:
        backlog.close()
        done.set()

    threading.Thread(target=close_later).start()
    assert backlog.take() is None
    assert done.wait(10)


def test_events_are_decoded_from_the_kernel_layout(inotify: ModuleType) -> None:
    """struct inotify_event: wd, mask, cookie, len, then len bytes of name padded with NULs."""
    raw = inotify.EVENT.pack(3, 0x100, 0, 16) + b"name\0" + b"\0" * 11 + inotify.EVENT.pack(-1, 0x4000, 0, 0)
    assert inotify.parse_events(raw) == [(3, 0x100, 0, b"name"), (-1, 0x4000, 0, b"")]
