"""Recursive inotify watcher built on watchdog's low-level `InotifyFD`.

Why not watchdog's Observer: it cannot keep watches off ignored trees, its default mask (IN_OPEN,
IN_CLOSE_NOWRITE) overflows its own queue on big trees, it swallows ENOSPC and hides queue overflows,
and a directory moved out of the tree keeps its watches (see shared/research/watchdog-on-linux.md).
Here every directory gets its own watch unless ignored, the mask holds only changes, every failure
is reported, and moves are paired by cookie in the reader thread.

Ordering: a reader thread drains the kernel queue in large reads into a bounded backlog; one handler
thread handles the events in kernel order and hands the changes on to `on_changes` (which may block:
that is the back-pressure). A *barrier* is a uniquely named file created
in a watched private directory: when its IN_CREATE is read, everything queued before it has been read.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pathspec
import structlog
from watchdog.observers.inotify_c import InotifyConstants as IN
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD, WatchDescriptor

from codi2.events import Action, Origin

log = structlog.get_logger("codi2.watcher")

WATCH_MASK = (
    IN.IN_CREATE
    | IN.IN_DELETE
    | IN.IN_MODIFY
    | IN.IN_CLOSE_WRITE
    | IN.IN_ATTRIB
    | IN.IN_MOVED_FROM
    | IN.IN_MOVED_TO
    | IN.IN_DELETE_SELF
    | IN.IN_MOVE_SELF
    | IN.IN_DONT_FOLLOW
    | IN.IN_ONLYDIR
    | IN.IN_EXCL_UNLINK
)
BARRIER_MASK = IN.IN_CREATE | IN.IN_ONLYDIR | IN.IN_DONT_FOLLOW
_CALLBACK_ID = 0
READ_BUFFER_BYTES = 1 << 20  # drains a full default kernel queue (16,384 events) in one read
MAX_BACKLOG_EVENTS = 1 << 18
# A watch re-added for a directory already watched (a rename seen late) is expected, not a problem.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


@dataclass(slots=True)
class Change:
    """A raw change as the kernel reported it; the pipeline coalesces and enriches it."""

    action: Action
    root: int
    path: bytes
    dest: bytes | None
    is_dir: bool
    ts: float
    origin: Origin = "live"


class IgnoreRules:
    """gitignore semantics over paths relative to a watch root, plus exact absolute paths (state dir)."""

    MEMO_SIZE = 8192

    def __init__(self, patterns: Iterable[str], excluded: Iterable[Path] = ()) -> None:
        self._spec = pathspec.GitIgnoreSpec.from_lines(list(patterns))
        self._excluded = {os.fsencode(p) for p in excluded}
        self._memo: dict[tuple[bytes, bool], bool] = {}

    def ignored(self, abs_path: bytes, rel: bytes, is_dir: bool) -> bool:
        if abs_path in self._excluded:
            return True
        key = (rel, is_dir)
        found = self._memo.get(key)
        if found is None:
            # A written file shows up as three events (create, modify, close): match it once.
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            text = os.fsdecode(rel)
            found = self._memo[key] = self._spec.match_file(text + "/" if is_dir else text)
        return found


@dataclass
class _PendingMove:
    root: int
    path: bytes
    is_dir: bool
    ts: float


@dataclass
class WatcherState:
    """What the health server reads; written only by the watcher."""

    watches: int = 0
    overflows: int = 0
    unwatched: dict[str, str] = field(default_factory=dict)
    handler_errors: int = 0


class _Backlog:
    """Events read from the kernel and not yet handled. Draining the kernel queue in large reads and
    handling the events in another thread keeps a burst from overflowing the kernel's 16k-event queue
    while Python handles events more slowly than a writer makes them. Bounded: when full, reading
    stops and the kernel queue is the next buffer (its overflow is detected and counted)."""

    def __init__(self, max_events: int) -> None:
        self._lists: deque[list[InotifyEvent]] = deque()
        self._count = 0
        self._max = max_events
        self._cond = threading.Condition()
        self._closed = False
        self.high_water = 0

    def put(self, events: list[InotifyEvent]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._count < self._max or self._closed)
            self._lists.append(events)
            self._count += len(events)
            self.high_water = max(self.high_water, self._count)
            self._cond.notify_all()

    def take(self) -> list[InotifyEvent] | None:
        """Everything pending, in order; None once closed (what is left came after the stop request)."""
        with self._cond:
            self._cond.wait_for(lambda: self._lists or self._closed)
            if self._closed:
                return None
            events = [e for chunk in self._lists for e in chunk]
            self._lists.clear()
            self._count = 0
            self._cond.notify_all()
            return events

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Reader(InotifyFD):
    """InotifyFD whose thread only drains the kernel queue into the backlog."""

    def __init__(self, backlog: _Backlog) -> None:
        super().__init__()
        self._backlog = backlog
        self.name = "codi2-inotify-read"

    def run(self) -> None:
        try:
            while self.should_keep_running():
                events = self.read_events(event_buffer_size=READ_BUFFER_BYTES)
                if events:
                    self._backlog.put(events)
        finally:
            self._backlog.close()


class Watcher:
    """Watches `roots` recursively, skipping ignored trees, and reports changes in kernel order."""

    def __init__(
        self,
        roots: list[Path],
        rules: IgnoreRules,
        barrier_dir: Path,
        on_changes: Callable[[list[Change]], None],
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._roots_b = [os.fsencode(r) for r in roots]
        self._rules = rules
        self._barrier_dir = barrier_dir
        self._on_changes = on_changes
        self._on_overflow = on_overflow
        self.state = WatcherState()
        self._fd: _Reader | None = None
        self._backlog = _Backlog(MAX_BACKLOG_EVENTS)
        self._handler: threading.Thread | None = None
        self._path_of: dict[int, tuple[int, bytes]] = {}
        self._wd_of: dict[tuple[int, bytes], int] = {}
        self._barrier_wd: int | None = None
        self._barrier_seq = itertools.count(1)
        self._barrier_waiters: dict[bytes, threading.Event] = {}
        self._barrier_lock = threading.Lock()
        self._out: list[Change] = []
        self._pending_moves: dict[int, _PendingMove] = {}
        self._move_barrier_sent = False
        self._now = time.time()

    # Lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Place every watch, then start reading. Raises OSError if a root cannot be watched at all."""
        self._barrier_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._barrier_dir.iterdir():
            stale.unlink(missing_ok=True)
        self._fd = _Reader(self._backlog)
        self._barrier_wd = self._fd.add_callback(os.fsencode(self._barrier_dir), BARRIER_MASK, self, _CALLBACK_ID)
        for index, root in enumerate(self._roots_b):
            if not os.path.isdir(root):
                raise OSError(errno.ENOENT, "watch path is not a directory", os.fsdecode(root))
            self._watch_tree(index, b"", report=False)
            if (index, b"") not in self._wd_of:
                reason = self.state.unwatched.get(os.fsdecode(root), "unknown error")
                raise OSError(errno.EIO, f"cannot watch: {reason}", os.fsdecode(root))
        self._handler = threading.Thread(target=self._handle_backlog, name="codi2-inotify-handle", daemon=True)
        self._handler.start()
        self._fd.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Read everything the kernel queued so far (a barrier), then close the inotify fd."""
        if self._fd is None:
            return
        if self.is_alive() and not self.barrier(timeout):
            log.warning("inotify_drain_timeout", timeout_s=timeout)
        self._backlog.close()  # the handler stops first, so closing the fd below races with nothing
        if self._handler is not None:
            self._handler.join(timeout)
        self._fd.stop()
        self._fd.join(timeout)
        self._fd = None

    def is_alive(self) -> bool:
        return self._fd is not None and self._fd.is_alive() and self._handler is not None and self._handler.is_alive()

    @property
    def backlog_high_water(self) -> int:
        """The most events ever waiting between the kernel read and their handling."""
        return self._backlog.high_water

    def _handle_backlog(self) -> None:
        """The handler thread: every event in kernel order, then the changes handed on in one list."""
        fd = self._fd
        assert fd is not None
        while (events := self._backlog.take()) is not None:
            for event in events:
                try:
                    fd.handle_event(event)
                except Exception:  # one bad event must not stop the watching of the whole workspace
                    self.state.handler_errors += 1
                    log.exception("inotify_event_failed", event=repr(event))
            self.buffer_done()

    def barrier(self, timeout: float = 10.0) -> bool:
        """Block until every change that happened before this call has been handed to `on_changes`."""
        waiter = threading.Event()
        name = self._make_barrier(waiter)
        done = waiter.wait(timeout)
        with self._barrier_lock:
            self._barrier_waiters.pop(name, None)
        return done

    def _make_barrier(self, waiter: threading.Event | None) -> bytes:
        name = f"b-{next(self._barrier_seq)}".encode()
        if waiter is not None:
            with self._barrier_lock:
                self._barrier_waiters[name] = waiter
        path = os.path.join(os.fsencode(self._barrier_dir), name)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        os.unlink(path)
        return name

    # Watches --------------------------------------------------------------------------------------

    def _abs(self, root: int, rel: bytes) -> bytes:
        return os.path.join(self._roots_b[root], rel) if rel else self._roots_b[root]

    def _add_watch(self, root: int, rel: bytes) -> bool:
        path = self._abs(root, rel)
        assert self._fd is not None
        try:
            wd = self._fd.add_callback(path, WATCH_MASK, self, _CALLBACK_ID)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False  # gone or replaced before we got there; its parent reports it
            self._report_unwatched(path, exc)
            return False
        if wd == -1:  # InotifyFD hides EACCES behind a -1 descriptor
            self._report_unwatched(path, PermissionError(errno.EACCES, "permission denied"))
            return False
        old = self._path_of.get(wd)
        if old is not None:
            self._wd_of.pop(old, None)
        self._path_of[wd] = (root, rel)
        self._wd_of[(root, rel)] = wd
        self.state.watches = len(self._path_of)
        return True

    def _report_unwatched(self, path: bytes, exc: OSError) -> None:
        text = os.fsdecode(path)
        if exc.errno == errno.ENOSPC:
            reason = "inotify watch limit reached: raise fs.inotify.max_user_watches"
        else:
            reason = exc.strerror or str(exc)
        self.state.unwatched[text] = reason
        log.warning("directory_unwatched", path=text, reason=reason, unwatched=len(self.state.unwatched))

    def _watch_tree(self, root: int, top: bytes, *, report: bool, revisit: bool = False) -> None:
        """Watch `top` and every non-ignored directory below it; with `report`, emit `created` for
        each entry found (files written into a new directory before its watch existed). Directories
        already watched are skipped unless `revisit` (after an overflow, new ones may hide below)."""
        stack = [top]
        while stack:
            rel = stack.pop()
            if (root, rel) in self._wd_of:
                if not revisit:
                    continue  # seen by an earlier walk
            elif not self._add_watch(root, rel):
                continue  # reported as unwatched
            base = self._abs(root, rel)
            try:
                with os.scandir(base) as it:
                    entries = list(it)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    self._report_unwatched(base, exc)
                continue
            for entry in entries:
                child = os.path.join(rel, entry.name) if rel else entry.name
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if self._rules.ignored(entry.path, child, is_dir):
                    continue
                if report:
                    self._out.append(Change("created", root, child, None, is_dir, self._now))
                if is_dir:
                    stack.append(child)

    def _unwatch_tree(self, root: int, top: bytes) -> None:
        """Drop the watches of a directory that left the tree, so nothing is reported under its old path."""
        prefix = top + b"/"
        gone = [
            (wd, key)
            for key, wd in self._wd_of.items()
            if key[0] == root and (key[1] == top or key[1].startswith(prefix))
        ]
        assert self._fd is not None
        for wd, key in gone:
            del self._wd_of[key]
            self._path_of.pop(wd, None)
        self._fd.remove_callbacks([(WatchDescriptor(wd), _CALLBACK_ID) for wd, _ in gone])
        self.state.watches = len(self._path_of)

    def _rename_tree(self, root: int, old: bytes, new: bytes) -> None:
        prefix = old + b"/"
        moved = [
            (key, wd)
            for key, wd in self._wd_of.items()
            if key[0] == root and (key[1] == old or key[1].startswith(prefix))
        ]
        for key, _ in moved:
            del self._wd_of[key]
        for (_, rel), wd in moved:
            new_rel = new + rel[len(old) :]
            self._path_of[wd] = (root, new_rel)
            self._wd_of[(root, new_rel)] = wd

    # Events (reader thread) ---------------------------------------------------------------------

    def on_event(self, event: InotifyEvent) -> None:
        if event.wd == self._barrier_wd:
            self._on_barrier(event.name)
            return
        where = self._path_of.get(event.wd)
        if where is None or not event.name:
            if where is not None and where[1] == b"" and (event.is_delete_self or event.is_move_self):
                log.error("watch_root_gone", root=os.fsdecode(self._roots_b[where[0]]))
            return
        root, parent = where
        rel = os.path.join(parent, event.name) if parent else event.name
        is_dir = bool(event.mask & IN.IN_ISDIR)
        if self._pending_moves and not (event.is_moved_to and event.cookie in self._pending_moves):
            self._flush_moves_out()
        if self._rules.ignored(os.path.join(self._roots_b[root], rel), rel, is_dir):
            return  # a move into an ignored name already counts as moved out (flushed above)
        self._now = time.time()
        if event.is_moved_from:
            self._pending_moves[event.cookie] = _PendingMove(root, rel, is_dir, self._now)
        elif event.is_moved_to:
            self._moved_to(event.cookie, root, rel, is_dir)
        elif event.is_create:
            self._out.append(Change("created", root, rel, None, is_dir, self._now))
            if is_dir:
                self._watch_tree(root, rel, report=True)
        elif event.is_delete:
            self._out.append(Change("deleted", root, rel, None, is_dir, self._now))
        elif event.is_modify or event.is_close_write or event.is_attrib:
            self._out.append(Change("updated", root, rel, None, is_dir, self._now))

    def _moved_to(self, cookie: int, root: int, rel: bytes, is_dir: bool) -> None:
        src = self._pending_moves.pop(cookie, None)
        if src is not None and src.root == root:
            self._out.append(Change("moved", root, src.path, rel, is_dir, self._now))
            if is_dir and (root, src.path) in self._wd_of:
                self._rename_tree(root, src.path, rel)
            elif is_dir:  # renamed before its watch was placed: what it holds was never reported
                self._watch_tree(root, rel, report=True)
            return
        if src is not None:  # between two watch roots: out of one, into the other
            self._move_out(src)
        self._out.append(Change("created", root, rel, None, is_dir, self._now))
        if is_dir:
            self._watch_tree(root, rel, report=True)

    def _move_out(self, move: _PendingMove) -> None:
        self._out.append(Change("deleted", move.root, move.path, None, move.is_dir, move.ts))
        if move.is_dir:
            self._unwatch_tree(move.root, move.path)

    def _flush_moves_out(self) -> None:
        for move in self._pending_moves.values():
            self._move_out(move)
        self._pending_moves.clear()

    def _on_barrier(self, name: bytes) -> None:
        # Any barrier settles pending moves: a rename queues IN_MOVED_TO right behind IN_MOVED_FROM.
        self._move_barrier_sent = False
        self._flush_moves_out()
        with self._barrier_lock:
            waiter = self._barrier_waiters.pop(name, None)
        if waiter is not None:
            self._hand_off()
            waiter.set()

    def buffer_done(self) -> None:
        if self._pending_moves and not self._move_barrier_sent:
            # The partner IN_MOVED_TO may sit in the next buffer; a barrier settles it either way.
            self._move_barrier_sent = True
            self._make_barrier(None)
        self._hand_off()

    def _hand_off(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self._on_changes(out)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        where = self._path_of.pop(wd, None)
        if where is not None and self._wd_of.get(where) == wd:
            del self._wd_of[where]
        self.state.watches = len(self._path_of)

    def on_queue_overflow(self) -> None:
        """Events were lost: watch directories created meanwhile, then let the owner rescan."""
        self.state.overflows += 1
        self._flush_moves_out()
        log.error(
            "inotify_queue_overflow",
            overflows=self.state.overflows,
            hint="raise fs.inotify.max_queued_events; a rescan recovers the changes",
        )
        for index in range(len(self._roots_b)):
            self._watch_tree(index, b"", report=False, revisit=True)
        self._hand_off()
        if self._on_overflow is not None:
            self._on_overflow()
