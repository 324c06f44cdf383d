"""Recursive inotify watcher: a tree of watched directories keyed by watch descriptor.

Identity, not paths. The kernel names a directory by its watch descriptor and its inode; a path is only
where that directory sat when an event was queued. So every watched directory is a `Node` (wd, parent,
name, inode) in a tree, a path is derived from the tree, and a rename is one update of one node. Events
are read in kernel order and interpreted against the tree as the earlier events left it, which is the
tree as it was when the event was queued, however far the daemon lags behind the disk.

Verify before trusting. Placing a watch, moving a node or forgetting one is checked against what the
disk holds now (the inode at that name, read through directory descriptors, never through a symlink).
When the two disagree (a name re-used, a directory replaced, an exchange, a lost event), the directory
is suspect: once everything queued so far has been read (a *barrier*), it is listed again, its children
are matched to nodes by inode, and the pipeline is asked to diff it against the index. That is how the
watcher heals, the way Watchman does: it recrawls what it cannot vouch for.

Output: hints for the pipeline, which reads the facts from the disk itself. `Touch(path)` says a path may
have changed; `Move` is a rename the kernel paired by cookie; `Rescan` asks for a directory (or a tree)
to be diffed against the index. A hint at a wrong path costs a look; a missing hint would lose a change,
so when in doubt the watcher hints more.

Threads: a reader drains the kernel queue in 1 MiB reads into a bounded backlog (a burst then waits in
memory instead of overflowing the kernel's 16k-event queue); one handler thread owns the tree and hands
hints on, never blocking on the pipeline. Barriers are `utime` calls on files in the private barrier
directory: they need no free disk space, so they keep working when the disk is full.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from watchdog.observers.inotify_c import InotifyConstants as IN
from watchdog.observers.inotify_c import inotify_add_watch, inotify_init, inotify_rm_watch

from codi2.disk.fs import ABSENT_ERRNOS, O_DIR, RESOURCE_ERRNOS, list_dir, open_dir
from codi2.disk.ignore import IgnoreRules
from codi2.trail.events import Origin
from codi2.watch.hints import Hint, Move, Rescan, Touch

log = structlog.get_logger("codi2.watch.watcher")

# No IN_DONT_FOLLOW: watches are placed through /proc/self/fd/N of a directory opened with O_NOFOLLOW,
# a magic link that must be followed to reach exactly the directory that was opened and checked.
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
    | IN.IN_ONLYDIR
    | IN.IN_EXCL_UNLINK
)
BARRIER_MASK = IN.IN_ATTRIB | IN.IN_ONLYDIR
# Anything but a write to a file: it may change what a name means, so it ends the run of writes.
_NOT_A_WRITE = ~(IN.IN_MODIFY | IN.IN_CLOSE_WRITE | IN.IN_ATTRIB) | IN.IN_ISDIR
_RESHAPES = ~IN.IN_CREATE | IN.IN_ISDIR  # all but a file created: a name may now mean something else
BARRIER_RING = 4  # consecutive barriers touch different files, so the kernel never merges two of them
READ_BUFFER_BYTES = 1 << 20  # drains a full default kernel queue (16,384 events) in one read
MAX_BACKLOG_EVENTS = 1 << 18
GATHER_EVENTS = 512
GATHER_S = 0.002
SMALL_READ_BYTES = 4096
EVENT = struct.Struct("iIII")


class Starved(Exception):
    """Out of file descriptors (or memory) while handling: a directory that cannot be opened now is not
    gone, so nothing may be concluded from it. Handling stops at that step, and every tree is recrawled
    once descriptors are back (as after a queue overflow)."""


class Node:
    """A watched directory (or, with `wd` None, a directory that could not be watched: `reason` says why)."""

    __slots__ = ("_gen", "_where", "children", "dev", "ino", "is_root", "name", "parent", "reason", "root", "wd")

    def __init__(self, root: int, parent: Node | None, name: bytes, wd: int | None, dev: int, ino: int) -> None:
        self.root = root
        self.parent = parent
        self.name = name
        self.wd = wd
        self.dev = dev
        self.ino = ino
        self.is_root = parent is None
        self.children: dict[bytes, Node] = {}
        self.reason: str | None = None
        self._gen = -1
        self._where: bytes | None = None

    @property
    def ident(self) -> tuple[int, int]:
        return self.dev, self.ino

    def locate(self, gen: int) -> bytes | None:
        """The path relative to the root (b"" for the root), or None when the node is out of the tree.
        Cached until the tree changes shape (`gen`): file events, the hot path, only read the cache."""
        if self._gen != gen:
            parts = []
            node = self
            where: bytes | None = None
            while True:
                if node.is_root:
                    where = b"/".join(reversed(parts))
                    break
                parent = node.parent
                if parent is None or parent.children.get(node.name) is not node:
                    break
                parts.append(node.name)
                node = parent
            self._gen, self._where = gen, where
        return self._where

    def walk(self) -> list[Node]:
        out, stack = [], [self]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


@dataclass
class _PendingMove:
    parent: Node
    name: bytes
    path: bytes
    is_dir: bool
    ignored: bool
    child: Node | None


@dataclass
class WatcherState:
    """What the health server reads; written only by the watcher's threads."""

    watches: int = 0
    overflows: int = 0
    recrawls: int = 0
    unwatched: dict[str, str] = field(default_factory=dict)
    handler_errors: int = 0
    roots_gone: list[str] = field(default_factory=list)
    out_of_descriptors: bool = False


class _Backlog:
    """Raw events read from the kernel and not yet handled, plus control requests for the handler.
    Bounded: when full, reading stops and the kernel queue is the next buffer (its overflow is detected
    and recovered by a recrawl)."""

    def __init__(self, max_events: int) -> None:
        self._items: deque[Any] = deque()
        self._count = 0
        self._max = max_events
        self._cond = threading.Condition()
        self._closed = False
        self.high_water = 0

    def put(self, item: Any, size: int = 1, *, wait: bool = True) -> None:
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: self._count < self._max or self._closed)
            was_empty = not self._items
            self._items.append(item)
            self._count += size
            self.high_water = max(self.high_water, self._count)
            if was_empty:  # the handler only ever waits on an empty backlog
                self._cond.notify_all()

    def take(self) -> list[Any] | None:
        """Everything pending, in order; None once closed. Woken by a few events, it lets a burst gather
        for a moment first: handing events over one read at a time costs more than handling them."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed)
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


def parse_events(buf: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    i, end = 0, len(buf)
    unpack = EVENT.unpack_from
    while i + 16 <= end:
        wd, mask, cookie, length = unpack(buf, i)
        out.append((wd, mask, cookie, buf[i + 16 : i + 16 + length].rstrip(b"\0")))
        i += 16 + length
    return out


class Watcher:
    """Watches `roots` recursively, skipping ignored trees, and hands hints on in kernel order."""

    def __init__(
        self,
        roots: list[Path],
        rules: IgnoreRules,
        barrier_dir: Path,
        on_hints: Callable[[list[Hint]], None],
        on_overflow: Callable[[], None] | None = None,
        on_descriptors_back: Callable[[], None] | None = None,
        max_backlog: int = MAX_BACKLOG_EVENTS,
    ) -> None:
        self._roots = [os.fsencode(r) for r in roots]
        self._rules = rules
        self._barrier_dir = barrier_dir
        self._on_hints = on_hints
        self._on_overflow = on_overflow
        self._on_descriptors_back = on_descriptors_back
        self.state = WatcherState()
        self._ifd: int | None = None
        self._root_fds: list[int] = []
        self._root_nodes: list[Node] = []
        self._gen = 0  # bumped whenever the tree changes shape
        self._nodes: dict[int, Node] = {}
        self._by_ident: dict[tuple[int, int], Node] = {}
        self._unwatched: set[Node] = set()
        self._unwatched_dirty = False
        # Work that waits for a barrier: {node: barrier seq, 0 until one is requested}.
        self._suspects: dict[Node, int] = {}
        self._deep_suspects: set[Node] = set()
        self._displaced: dict[Node, int] = {}
        self._unassigned = False
        self._pending: dict[int, _PendingMove] = {}
        self._written: set[tuple[int, bytes]] = set()  # files written in this read buffer
        self._out: list[Hint] = []
        self._backlog = _Backlog(max_backlog)
        self._reader: threading.Thread | None = None
        self._handler: threading.Thread | None = None
        self._stopping = False
        self._barrier_wd: int | None = None
        self._barrier_files: list[bytes] = []
        self._barrier_lock = threading.Lock()
        self._barrier_cond = threading.Condition()
        self._barriers_requested = 0
        self._barriers_seen = 0
        self._outstanding: deque[int] = deque()  # requested barriers whose event has not been read

    # Life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Place every watch, then start reading. Raises OSError naming a root that cannot be watched."""
        for root in self._roots:
            check_root(root)
        ifd = inotify_init()
        if ifd < 0:
            raise OSError(
                errno.EMFILE,
                "cannot create an inotify instance: raise fs.inotify.max_user_instances, or the open-file limit"
                " (nofile)",
            )
        os.set_inheritable(ifd, False)
        self._ifd = ifd
        try:
            self._setup_barriers()
            for index, root in enumerate(self._roots):
                fd = os.open(root, O_DIR)
                self._root_fds.append(fd)
                st = os.fstat(fd)
                wd = self._add_watch(fd)
                if wd < 0:
                    raise OSError(-wd, f"cannot watch: {os.strerror(-wd)}", os.fsdecode(root))
                node = Node(index, None, b"", wd, st.st_dev, st.st_ino)
                self._register(node)
                self._root_nodes.append(node)
                self._walk_new(node, fd)
        except BaseException:
            self._close()
            raise
        self._refresh_state()
        self._handler = threading.Thread(target=self._handle_loop, name="codi2-inotify-handle", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="codi2-inotify-read", daemon=True)
        self._handler.start()
        self._reader.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Read everything the kernel queued so far (a barrier), hand it on, then close."""
        if self._ifd is None:
            return
        if self.is_alive() and not self.barrier(timeout):
            log.warning("inotify_drain_timeout", timeout_s=timeout)
        self._stopping = True
        self._backlog.close()
        if self._handler is not None:
            self._handler.join(timeout)
        if self._reader is not None and self._request_barrier() is not None:  # wakes the blocking read
            self._reader.join(timeout)
        self._close()

    def _close(self) -> None:
        for fd in self._root_fds:
            os.close(fd)
        self._root_fds = []
        # A reader still blocked in read() keeps the descriptor: closing it under the thread could hand
        # the number to another file. It only happens when no barrier could be made; the process ends.
        if self._ifd is not None and (self._reader is None or not self._reader.is_alive()):
            os.close(self._ifd)
            self._ifd = None

    def is_alive(self) -> bool:
        return (
            self._reader is not None
            and self._reader.is_alive()
            and self._handler is not None
            and self._handler.is_alive()
        )

    def degraded(self) -> list[str]:
        ws = self.state
        reasons = []
        if ws.unwatched:
            reasons.append(
                f"{len(ws.unwatched)} directories unwatched (see unwatched; "
                "for a watch limit raise fs.inotify.max_user_watches)"
            )
        if ws.overflows:
            reasons.append(f"inotify queue overflowed {ws.overflows} times")
        if ws.out_of_descriptors:
            reasons.append("the watcher is out of file descriptors: every tree is recrawled when they are back")
        if ws.handler_errors:
            reasons.append(f"{ws.handler_errors} inotify events failed to be handled (see the logs)")
        reasons += [f"watch root gone: {root}" for root in ws.roots_gone]
        return reasons

    def snapshot(self) -> dict[str, Any]:
        """The watcher's part of /status."""
        ws = self.state
        return {
            "watches": ws.watches,
            "unwatched": dict(ws.unwatched),
            "inotify_overflows": ws.overflows,
            "inotify_backlog_high_water": self._backlog.high_water,
            "recrawls": ws.recrawls,
            "out_of_descriptors": ws.out_of_descriptors,
        }

    # Barriers --------------------------------------------------------------------------------------

    def _setup_barriers(self) -> None:
        try:
            self._barrier_dir.mkdir(parents=True, exist_ok=True)
            base = os.fsencode(self._barrier_dir)
            files = [os.path.join(base, b"b%d" % i) for i in range(BARRIER_RING)]
            for path in files:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            log.error("barrier_unavailable", path=str(self._barrier_dir), error=exc.strerror)
            return
        assert self._ifd is not None
        wd = inotify_add_watch(self._ifd, base, BARRIER_MASK)
        if wd < 0:
            log.error("barrier_unavailable", path=str(self._barrier_dir), error="cannot watch it")
            return
        self._barrier_files = files
        self._barrier_wd = wd

    def _request_barrier(self) -> int | None:
        """Touch the next barrier file: its event marks this point of the kernel queue. None if that
        failed; then callers act at once (a little early beats never)."""
        if self._barrier_wd is None:
            return None
        with self._barrier_lock:
            seq = self._barriers_requested + 1
            try:
                os.utime(self._barrier_files[seq % BARRIER_RING])
            except OSError as exc:
                log.warning("barrier_failed", error=exc.strerror)
                return None
            self._barriers_requested = seq
            self._outstanding.append(seq)
            return seq

    def barrier(self, timeout: float = 10.0) -> bool:
        """Block until every change that happened before this call has been handed to `on_hints`."""
        seq = self._request_barrier()
        if seq is None:
            return False
        with self._barrier_cond:
            return self._barrier_cond.wait_for(lambda: self._barriers_seen >= seq, timeout)

    def request(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the handler thread, in order with the events (the tree belongs to that thread)."""
        self._backlog.put(("call", fn), wait=False)

    # Reading (reader thread) ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        assert self._ifd is not None
        try:
            while not self._stopping:
                try:
                    buf = os.read(self._ifd, READ_BUFFER_BYTES)
                except InterruptedError:
                    continue
                events = parse_events(buf)
                if events:
                    self._backlog.put(("events", events), len(events))
                if len(buf) < SMALL_READ_BYTES:
                    # A writer makes events one at a time; waking for each costs more than the event.
                    # Let a few gather in the kernel's queue (which holds 16k) before the next read.
                    time.sleep(GATHER_S)
        except OSError as exc:
            if not self._stopping:
                log.error("inotify_read_failed", error=str(exc))
        finally:
            self._backlog.close()

    # Handling (handler thread) ----------------------------------------------------------------------

    def _handle_loop(self) -> None:
        while (items := self._backlog.take()) is not None:
            for kind, payload in items:
                if kind == "call":
                    self._guarded(payload)
                    continue
                for event in payload:
                    try:
                        self._handle(*event)
                    except Starved as exc:
                        self._starved(exc)
                    except Exception:  # one bad event must not stop the watching of the whole workspace
                        self.state.handler_errors += 1
                        log.exception("inotify_event_failed", event=repr(event))
            self._guarded(self._end_of_buffer)

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Starved as exc:
            self._starved(exc)
        except Exception:
            self.state.handler_errors += 1
            log.exception("watcher_step_failed", step=getattr(fn, "__name__", repr(fn)))

    def _end_of_buffer(self) -> None:
        self._written.clear()
        if self._pending or self._unassigned:
            # The partner of a rename may sit in the next read, and suspects wait until all is read.
            seq = self._request_barrier()
            if seq is None:
                self._settle_moves()
                self._heal(None)
            elif self._unassigned:
                for pending in (self._suspects, self._displaced):
                    for node, assigned in pending.items():
                        if not assigned:
                            pending[node] = seq
            self._unassigned = False
        self._hand_off()
        self._refresh_state()

    def _hand_off(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self._on_hints(out)

    def _handle(self, wd: int, mask: int, cookie: int, name: bytes) -> None:
        if wd == self._barrier_wd:
            if mask & IN.IN_ATTRIB and name[:1] == b"b" and name[1:].isdigit():
                self._on_barrier(int(name[1:]))
            return
        if not mask & _NOT_A_WRITE:
            # A write to a file (modify, close, attrib): a file written shows up as three events, and the
            # first one of a read buffer already said "look here", unless the tree changed since.
            key = (wd, name)
            if key in self._written:
                return
            self._written.add(key)
        elif mask & _RESHAPES:
            self._written.clear()
        else:  # a file created: its own writes that follow add nothing
            self._written.add((wd, name))
        if mask & IN.IN_Q_OVERFLOW:
            self._on_overflow_event()
            return
        node = self._nodes.get(wd)
        if node is None:
            return  # a watch already dropped: its late events describe nothing in the tree
        if mask & IN.IN_IGNORED:
            self._watch_removed(node)
            return
        if not name:
            if mask & (IN.IN_DELETE_SELF | IN.IN_UNMOUNT):
                self._self_gone(node)
            elif mask & IN.IN_MOVE_SELF and node.is_root:
                self._root_gone(node)
            return
        if self._pending and not (mask & IN.IN_MOVED_TO and cookie in self._pending):
            self._settle_moves()
        where = node.locate(self._gen)
        if where is None:
            return  # displaced: the recrawl that finds it again diffs its whole tree
        is_dir = bool(mask & IN.IN_ISDIR)
        rel = where + b"/" + name if where else name
        if mask & IN.IN_MOVED_FROM:
            ignored = self._rules.ignored(node.root, rel, is_dir)
            child = node.children.get(name) if is_dir else None
            self._pending[cookie] = _PendingMove(node, name, rel, is_dir, ignored, child)
            return
        if mask & IN.IN_MOVED_TO:
            self._moved_to(node, name, rel, is_dir, self._pending.pop(cookie, None))
            return
        if self._rules.ignored(node.root, rel, is_dir):
            return
        self._out.append(Touch(node.root, rel, bool(mask & IN.IN_CREATE), is_dir))
        if not is_dir:
            return
        if mask & IN.IN_CREATE:
            self._attach(node, name)
        elif mask & IN.IN_DELETE:
            self._child_deleted(node, name)
        elif mask & IN.IN_ATTRIB:
            child = node.children.get(name)
            if child is None or child.wd is None:  # a permission change may have made it watchable
                self._attach(node, name)

    # Renames --------------------------------------------------------------------------------------

    def _moved_to(self, parent: Node, name: bytes, rel: bytes, is_dir: bool, src: _PendingMove | None) -> None:
        ignored = self._rules.ignored(parent.root, rel, is_dir)
        if src is not None and not src.ignored and (ignored or src.parent.root != parent.root):
            self._moved_out(src)  # into an ignored name or another root: it left this trail
            src = None
        if ignored:
            return
        if src is None or src.ignored:  # moved in from outside, or out of an ignored name
            self._out.append(Touch(parent.root, rel, True, is_dir))
            if is_dir:
                self._attach(parent, name)
            return
        child = src.child
        if not is_dir or child is None:
            self._out.append(Move(parent.root, src.path, rel, is_dir, None))
            if is_dir:
                self._attach(parent, name)
            return
        if self._ident_at(parent, name) == child.ident:
            self._out.append(Move(parent.root, src.path, rel, True, child.ino))
            self._place(parent, name, child)
            if self._rules.path_dependent:
                self._suspect(child, deep=True)  # what is ignored below it may differ at its new place
            return
        # The node we hold for the old name is not what moved: a newer directory took the name while we
        # lagged, or the one that moved has moved on. Let the pipeline check the disk, and look again.
        self._out.append(Move(parent.root, src.path, rel, True, None))
        if self._ident_at(src.parent, src.name) != child.ident:
            self._displace(child)
        self._suspect(src.parent)
        self._suspect(parent)

    def _settle_moves(self) -> None:
        """Renames whose partner never came: moved out of every watched tree."""
        pending, self._pending = self._pending, {}
        for move in pending.values():
            if not move.ignored:
                self._moved_out(move)

    def _moved_out(self, move: _PendingMove) -> None:
        self._out.append(Touch(move.parent.root, move.path))
        child = move.child
        if child is not None and move.parent.children.get(move.name) is child:
            self._drop(child)

    # Watches ---------------------------------------------------------------------------------------

    def _add_watch(self, fd: int) -> int:
        """A watch on exactly the directory `fd` refers to; -errno on failure."""
        assert self._ifd is not None
        wd = inotify_add_watch(self._ifd, b"/proc/self/fd/%d" % fd, WATCH_MASK)
        return wd if wd >= 0 else -(ctypes.get_errno() or errno.EIO)

    def _register(self, node: Node) -> None:
        if node.wd is not None:
            self._nodes[node.wd] = node
        self._by_ident[node.ident] = node

    def _dir_fd(self, node: Node) -> int:
        """A new descriptor of `node`'s directory at its tree path; raises OSError if that is not `node`."""
        where = node.locate(self._gen)
        if where is None:
            raise FileNotFoundError(errno.ENOENT, "not in the tree")
        try:
            fd = open_dir(self._root_fds[node.root], where)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise Starved(exc.strerror) from exc
            raise
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != node.ident:
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "another directory is at this path now")
        return fd

    def _ident_at(self, parent: Node, name: bytes) -> tuple[int, int] | None:
        """(dev, inode) of the directory at parent/name now; None if there is none we can see."""
        try:
            fd = self._dir_fd(parent)
        except OSError:
            return None
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(fd)
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

    def _attach(self, parent: Node, name: bytes) -> None:
        """Watch the directory at parent/name now and everything below it that is not ignored."""
        try:
            pfd = self._dir_fd(parent)
        except OSError:
            self._suspect(parent)  # the parent itself moved: settle once everything is read
            return
        try:
            self._attach_at(parent, pfd, name)
        finally:
            os.close(pfd)

    def _attach_at(self, parent: Node, pfd: int, name: bytes, *, quiet: bool = False) -> Node | None:
        existing = parent.children.get(name)
        if existing is not None and existing.wd is None:  # an unwatched directory: this is its retry
            self._detach(existing)
            self._unwatched.discard(existing)
            quiet = True
            existing = None
        try:
            fd = os.open(name, O_DIR, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in ABSENT_ERRNOS:
                if existing is not None:
                    self._displace(existing)  # gone or no longer a directory: its events will say where
                return None
            return self._unwatched_at(parent, pfd, name, exc.strerror or str(exc), quiet=quiet)
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            if self._rules.private_dir(*ident):
                return None  # the daemon's own state dir under another name: never watched
            if existing is not None and existing.ident == ident and existing.wd is not None:
                return existing  # already watched (a recrawl found it before its event was read)
            known = self._by_ident.get(ident)
            if known is not None and known.wd is not None and known is not existing:
                # A directory we watch, found at a new place: take it there and diff its whole tree.
                old_parent = known.parent if known.locate(self._gen) is not None else None
                self._place(parent, name, known)
                self._displaced.pop(known, None)
                if old_parent is not None:
                    self._suspect(old_parent)
                self._out.append(Rescan(known.root, known.locate(self._gen) or b"", True))
                return known
            if existing is not None:
                self._displace(existing)
            wd = self._add_watch(fd)
            if wd < 0:
                return self._unwatched_node(parent, name, st, self._watch_error(-wd), quiet=quiet)
            node = Node(parent.root, parent, name, wd, st.st_dev, st.st_ino)
            self._register(node)
            self._place(parent, name, node)
            try:
                self._walk_new(node, fd)
            except OSError as exc:  # its own listing
                self._drop(node)
                return self._unwatched_node(parent, name, st, exc.strerror or str(exc), quiet=quiet)
            # Watched from now on: what it holds must be looked at after this moment, whatever a walk of
            # its parent saw before (the pipeline walks a directory it is told was created).
            self._out.append(Touch(parent.root, node.locate(self._gen) or b"", True, True))
            return node
        finally:
            os.close(fd)

    def _unwatched_at(self, parent: Node, pfd: int, name: bytes, reason: str, *, quiet: bool) -> Node | None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        return self._unwatched_node(parent, name, st, reason, quiet=quiet)

    def _unwatched_node(self, parent: Node, name: bytes, st: os.stat_result, reason: str, *, quiet: bool) -> Node:
        """A directory we could not watch stays in the tree (renames carry it) and is diffed periodically."""
        node = Node(parent.root, parent, name, None, st.st_dev, st.st_ino)
        node.reason = reason
        self._place(parent, name, node)
        self._unwatched.add(node)
        if not quiet:
            log.warning("directory_unwatched", path=os.fsdecode(node.locate(self._gen) or b""), reason=reason)
        return node

    @staticmethod
    def _watch_error(code: int) -> str:
        if code == errno.ENOSPC:
            return "inotify watch limit reached: raise fs.inotify.max_user_watches"
        return os.strerror(code)

    def _walk_new(self, top: Node, top_fd: int) -> None:
        """Watch every non-ignored directory below a newly watched one, depth first, holding one
        descriptor per level: depth is unlimited, and the walk never leaves through a symlink. A
        directory below it that cannot be listed (out of descriptors) is left unwatched, so it is reported
        and tried again; raises OSError when `top` itself cannot be."""
        stack: list[tuple[Node, int, bytes, list[tuple[bytes, bool | None, int]]]] = []
        try:
            entries = list_dir(top_fd)
            stack.append((top, os.dup(top_fd), top.locate(self._gen) or b"", entries))
            while stack:
                node, fd, where, entries = stack[-1]
                if not entries:
                    os.close(fd)
                    stack.pop()
                    continue
                name, is_dir, _ = entries.pop()
                rel = where + b"/" + name if where else name
                if is_dir is False or self._rules.ignored(node.root, rel, True):
                    continue
                try:
                    cfd = os.open(name, O_DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in ABSENT_ERRNOS:
                        self._unwatched_at(node, fd, name, exc.strerror or str(exc), quiet=False)
                    continue
                st = os.fstat(cfd)
                existing = node.children.get(name)
                if existing is not None and existing.ident == (st.st_dev, st.st_ino):
                    os.close(cfd)
                    continue
                if self._rules.private_dir(st.st_dev, st.st_ino):  # the daemon's own, under another name
                    os.close(cfd)
                    continue
                wd = self._add_watch(cfd)
                if wd < 0:
                    os.close(cfd)
                    self._unwatched_node(node, name, st, self._watch_error(-wd), quiet=False)
                    continue
                child = Node(node.root, node, name, wd, st.st_dev, st.st_ino)
                self._register(child)
                self._place(node, name, child)
                try:
                    entries = list_dir(cfd)
                except OSError as exc:
                    os.close(cfd)
                    self._drop(child)
                    self._unwatched_node(node, name, st, exc.strerror or str(exc), quiet=False)
                    continue
                stack.append((child, cfd, rel, entries))
        finally:
            for _, fd, _, _ in stack:
                os.close(fd)

    # Tree changes ----------------------------------------------------------------------------------

    def _place(self, parent: Node, name: bytes, node: Node) -> None:
        """Put `node` at parent/name, taking it from wherever it was; what was there is displaced."""
        self._detach(node)
        old = parent.children.get(name)
        if old is not None and old is not node:
            self._displace(old)
        node.parent = parent
        node.name = name
        parent.children[name] = node
        self._gen += 1
        self._unwatched_dirty = True

    def _detach(self, node: Node) -> None:
        parent = node.parent
        if parent is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]
            self._gen += 1
            self._unwatched_dirty = True

    def _displace(self, node: Node) -> None:
        """Out of the tree, kept by inode until the next barrier: a recrawl may find it elsewhere."""
        parent = node.parent
        self._detach(node)
        node.parent = None
        if node not in self._displaced:
            self._displaced[node] = 0
            self._unassigned = True
        if parent is not None:
            self._suspect(parent)

    def _drop(self, node: Node) -> None:
        """Forget a directory and everything below it, removing their watches."""
        self._detach(node)
        node.parent = None
        assert self._ifd is not None
        for n in node.walk():
            self._displaced.pop(n, None)
            self._suspects.pop(n, None)
            if self._by_ident.get(n.ident) is n:
                del self._by_ident[n.ident]
            if n.wd is not None:
                if self._nodes.pop(n.wd, None) is not None:
                    inotify_rm_watch(self._ifd, n.wd)
            elif n in self._unwatched:
                self._unwatched.discard(n)
                self._unwatched_dirty = True

    def _suspect(self, node: Node, *, deep: bool = False) -> None:
        if deep:
            self._deep_suspects.add(node)
        if node not in self._suspects:
            self._suspects[node] = 0
            self._unassigned = True

    def _child_deleted(self, parent: Node, name: bytes) -> None:
        child = parent.children.get(name)
        if child is not None and self._ident_at(parent, name) != child.ident:
            self._drop(child)

    def _self_gone(self, node: Node) -> None:
        """IN_DELETE_SELF: the directory was removed (its parent's IN_DELETE follows)."""
        if node.is_root:
            self._root_gone(node)
            return
        where = node.locate(self._gen)
        if where is not None:
            self._out.append(Touch(node.root, where))
        self._drop(node)

    def _watch_removed(self, node: Node) -> None:
        """IN_IGNORED for a watch we still hold: the kernel dropped it without our asking (a file system
        unmounted, a deletion we had not read of). Look again at its parent."""
        if node.wd is not None:
            self._nodes.pop(node.wd, None)
        if node.is_root:
            self._root_gone(node)
            return
        where = node.locate(self._gen)
        parent = node.parent
        if where is not None and parent is not None:
            self._out.append(Touch(node.root, where))
            self._suspect(parent)
        self._drop(node)

    def _root_gone(self, node: Node) -> None:
        root = os.fsdecode(self._roots[node.root])
        if root not in self.state.roots_gone:
            self.state.roots_gone.append(root)
            log.error("watch_root_gone", root=root, hint="restart codi2 once the directory is back")

    # Healing ---------------------------------------------------------------------------------------

    def _on_barrier(self, ring: int) -> None:
        with self._barrier_lock:
            # Barriers lost to a queue overflow are skipped; a late one already counted is stale.
            while self._outstanding and self._outstanding[0] % BARRIER_RING != ring:
                self._outstanding.popleft()
            if not self._outstanding:
                return
            self._barriers_seen = self._outstanding.popleft()
        self._settle_moves()
        self._heal(self._barriers_seen)
        self._hand_off()
        with self._barrier_cond:
            self._barrier_cond.notify_all()

    def _heal(self, seen: int | None) -> None:
        """Recrawl the suspects whose barrier has passed, and those found in the read this barrier ends
        (a little early at worst, and everything is checked against the disk again): whoever waits on a
        barrier then sees the tree healed. Then forget the displaced directories no recrawl found again."""
        due = [n for n, s in self._suspects.items() if seen is None or s <= seen]
        for node in due:
            del self._suspects[node]
        for node in due:
            deep = node in self._deep_suspects
            self._deep_suspects.discard(node)
            if node.locate(self._gen) is not None:
                self._recrawl(node, recursive=deep)
        self._heal_displaced(seen)

    def _heal_displaced(self, seen: int | None) -> None:
        lost = [n for n, s in self._displaced.items() if seen is None or 0 < s <= seen]
        for node in lost:
            self._displaced.pop(node, None)
            if node.locate(self._gen) is None:
                self._drop(node)

    def _recrawl(self, top: Node, *, recursive: bool, origin: Origin = "rescan") -> None:
        """List directories again, match their subdirectories to nodes by inode, watch what is new and
        displace what is gone; then ask the pipeline to diff the same tree against the index."""
        node = top
        while True:  # the first ancestor that is still where the tree says
            try:
                os.close(self._dir_fd(node))
                break
            except OSError:
                parent = node.parent
                if node.is_root or parent is None:
                    return
                self._displace(node)
                node, recursive = parent, True
        self.state.recrawls += 1
        stack = [node]
        while stack:
            current = stack.pop()
            try:
                fd = self._dir_fd(current)
            except OSError:
                continue
            try:
                self._relist(current, fd, stack if recursive else None)
            finally:
                os.close(fd)
        where = node.locate(self._gen)
        if where is not None:
            self._out.append(Rescan(node.root, where, recursive, origin))

    def _relist(self, node: Node, fd: int, descend: list[Node] | None) -> None:
        try:
            listing = list_dir(fd)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise Starved(exc.strerror) from exc
            log.warning("directory_unlistable", path=os.fsdecode(node.locate(self._gen) or b""), error=exc.strerror)
            return
        where = node.locate(self._gen) or b""
        present: set[bytes] = set()
        for name, is_dir, _ in listing:
            rel = where + b"/" + name if where else name
            if is_dir is False or self._rules.ignored(node.root, rel, True):
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            present.add(name)
            child = node.children.get(name)
            if child is not None and child.ident == (st.st_dev, st.st_ino):
                if child.wd is None:
                    self._retry(child, fd)
                elif descend is not None:
                    descend.append(child)
                continue
            self._attach_at(node, fd, name)
        for name, child in list(node.children.items()):
            if name not in present:
                self._displace(child)

    def _retry(self, node: Node, parent_fd: int) -> Node | None:
        """Try again to watch a directory that could not be watched before."""
        parent = node.parent
        assert parent is not None
        placed = self._attach_at(parent, parent_fd, node.name)
        if placed is not None and placed.wd is not None:
            log.info("directory_watched", path=os.fsdecode(placed.locate(self._gen) or b""))
        return placed

    def retry_unwatched(self) -> None:
        """Handler thread (through `request`): after running out of descriptors, recrawl every tree; try
        every unwatched directory again, and diff the tree of each one against the index (a new watch may
        have missed changes; a still unwatched one is only covered by these periodic diffs)."""
        if self.state.out_of_descriptors:
            self._recrawl_all()  # still short: raises Starved, and the next try is the next tick's
            self.state.out_of_descriptors = False
            log.info("watcher_descriptors_back")
            if self._on_descriptors_back is not None:
                self._on_descriptors_back()
        for node in list(self._unwatched):
            parent = node.parent
            if parent is None or node.locate(self._gen) is None:
                self._unwatched.discard(node)
                continue
            try:
                pfd = self._dir_fd(parent)
            except OSError:
                continue
            try:
                placed = self._retry(node, pfd)
            finally:
                os.close(pfd)
            where = placed.locate(self._gen) if placed is not None else None
            if where is not None:
                self._out.append(Rescan(node.root, where, True))
        self._hand_off()
        self._refresh_state()

    def _on_overflow_event(self) -> None:
        """Events were lost: recrawl every tree (watching what appeared) and diff every root."""
        self.state.overflows += 1
        log.error(
            "inotify_queue_overflow",
            overflows=self.state.overflows,
            hint="raise fs.inotify.max_queued_events; a recrawl recovers the changes",
        )
        self._recrawl_all()
        if self._on_overflow is not None:
            self._on_overflow()

    def _recrawl_all(self) -> None:
        """Events were lost, or never handled whole: recrawl every tree (watching what appeared), settle
        everything that waited for a barrier, and diff every root."""
        self._settle_moves()
        for node in self._root_nodes:
            self._recrawl(node, recursive=True)
        # Everything asked of a barrier so far is settled by this recrawl: some of those barriers' own
        # events may have been dropped with the rest.
        with self._barrier_lock:
            self._barriers_seen = self._barriers_requested
            self._outstanding.clear()
        self._suspects.clear()
        self._deep_suspects.clear()
        self._heal_displaced(None)
        self._hand_off()
        with self._barrier_cond:
            self._barrier_cond.notify_all()

    def _starved(self, exc: Starved) -> None:
        if not self.state.out_of_descriptors:
            log.error(
                "watcher_out_of_descriptors",
                error=str(exc),
                hint="raise the open-file limit (nofile); every tree is recrawled when descriptors are back",
            )
        self.state.out_of_descriptors = True

    def _refresh_state(self) -> None:
        self.state.watches = len(self._nodes)
        if self._unwatched_dirty:
            self._unwatched_dirty = False
            unwatched = {}
            for n in self._unwatched:
                where = n.locate(self._gen)
                if where is not None:
                    unwatched[os.fsdecode(os.path.join(self._roots[n.root], where))] = n.reason or "unknown"
            self.state.unwatched = unwatched


def check_root(root: bytes) -> None:
    """A root must be a real directory: one line naming it otherwise."""
    try:
        st = os.lstat(root)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fsdecode(root)) from None
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "is a symlink; name the directory it points to", os.fsdecode(root))
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "not a directory", os.fsdecode(root))
