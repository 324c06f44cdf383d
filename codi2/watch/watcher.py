"""Recursive inotify watcher: kernel events interpreted against a tree of watched directories, into hints.

The parts, split as Watchman splits them: `inotify` is the kernel (the instance, its watches, the reader
thread and its backlog), `tree` the view (watched directories by watch descriptor and inode, verified
against the disk), `barriers` the cookies (marks in the kernel queue). This module is what is left:
`Watcher` reads events in kernel order, in one handler thread that owns the tree, and interprets each
against the tree as the earlier events left it, which is the tree as it was when the event was queued,
however far the daemon lags behind the disk; `Healer` grows the tree (watches on new directories) and
mends it (recrawls), as Watchman's crawler does for its watchers.

Verify before trusting. Placing a watch, moving a node or forgetting one is checked against what the
disk holds now (the inode at that name, read through directory descriptors, never through a symlink).
When the two disagree (a name re-used, a directory replaced, an exchange, a lost event), the directory
is suspect: once everything queued so far has been read (a barrier), it is listed again, its children
are matched to nodes by inode, and the pipeline is asked to diff it against the index. That is how the
watcher heals, the way Watchman does: it recrawls what it cannot vouch for.

Output: hints for the pipeline, which reads the facts from the disk itself. `Touch(path)` says a path may
have changed; `Move` is a rename the kernel paired by cookie; `Rescan` asks for a directory (or a tree)
to be diffed against the index. A hint at a wrong path costs a look; a missing hint would lose a change,
so when in doubt the watcher hints more. The handler never blocks on the pipeline.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from codi2.disk.fs import ABSENT_ERRNOS, O_DIR, RESOURCE_ERRNOS, list_dir
from codi2.disk.ignore import IgnoreRules
from codi2.watch.barriers import Barriers
from codi2.watch.hints import Hint, Move, Rescan, RootReplaced, Touch
from codi2.watch.inotify import IN, MAX_BACKLOG_EVENTS, Inotify
from codi2.watch.mounts import MountWatch
from codi2.watch.roots import Parents, ident_at
from codi2.watch.tree import Node, Starved, Tree

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
# Anything but a write to a file: it may change what a name means, so it ends the run of writes.
_NOT_A_WRITE = ~(IN.IN_MODIFY | IN.IN_CLOSE_WRITE | IN.IN_ATTRIB) | IN.IN_ISDIR
_RESHAPES = ~IN.IN_CREATE | IN.IN_ISDIR  # all but a file created: a name may now mean something else


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
    roots_reestablished: int = 0
    out_of_descriptors: bool = False


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
        on_mounts_changed: Callable[[], None] | None = None,
        max_backlog: int = MAX_BACKLOG_EVENTS,
        check_interval_s: float = 60.0,
    ) -> None:
        self._rules = rules
        self._on_hints = on_hints
        self._on_overflow = on_overflow
        self._on_descriptors_back = on_descriptors_back
        self._on_mounts_changed = on_mounts_changed
        self.state = WatcherState()
        self._inotify = Inotify(max_backlog)
        self._barriers = Barriers(barrier_dir)
        self._tree = Tree([os.fsencode(r) for r in roots])
        self._parents = Parents(self._tree.roots, self._inotify.watch, self._inotify.unwatch)
        self._real_roots = [os.path.realpath(r) for r in self._tree.roots]  # as the mount table names them
        self._mounts = MountWatch(self._request_mounts_changed, self._request_check_roots, check_interval_s)
        self._handler: threading.Thread | None = None
        self._out: list[Hint] = []  # hints not yet handed on, from both interpretation and healing
        self._healer = Healer(self._tree, self._inotify, rules, self.state, self._out)
        # What the read buffer being interpreted has said so far.
        self._pending: dict[int, _PendingMove] = {}
        self._written: set[tuple[int, bytes]] = set()  # files written in this read buffer

    # Life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Place every watch, then start reading. Raises OSError naming a root that cannot be watched."""
        for root in self._tree.roots:
            check_root(root)
        self._inotify.open()
        try:
            self._barriers.arm(self._inotify.watch)
            for index in range(len(self._tree.roots)):
                self._parents.arm(index)
                self._watch_root(index)
        except BaseException:
            self._close()
            raise
        self._refresh_state()
        self._handler = threading.Thread(target=self._handle_loop, name="codi2-inotify-handle", daemon=True)
        self._handler.start()
        self._inotify.start()
        self._mounts.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Read everything the kernel queued so far (a barrier), hand it on, then close."""
        if self._inotify.fd is None:
            return
        self._mounts.stop(timeout)
        if self.is_alive() and not self.barrier(timeout):
            log.warning("inotify_drain_timeout", timeout_s=timeout)
        self._inotify.stop()
        if self._handler is not None:
            self._handler.join(timeout)
        if self._inotify.started and self._barriers.request() is not None:  # wakes the blocking read
            self._inotify.join(timeout)
        self._close()

    def _close(self) -> None:
        self._tree.close()
        self._inotify.close()

    def is_alive(self) -> bool:
        return self._inotify.is_reading() and self._handler is not None and self._handler.is_alive()

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
            "inotify_backlog_high_water": self._inotify.backlog.high_water,
            "recrawls": ws.recrawls,
            "out_of_descriptors": ws.out_of_descriptors,
        }

    def barrier(self, timeout: float = 10.0) -> bool:
        """Block until every change that happened before this call has been handed to `on_hints`."""
        seq = self._barriers.request()
        return seq is not None and self._barriers.wait(seq, timeout)

    def request(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the handler thread, in order with the events (the tree belongs to that thread)."""
        self._inotify.backlog.put(fn, wait=False)

    # Handling (handler thread) ----------------------------------------------------------------------

    def _handle_loop(self) -> None:
        while (items := self._inotify.backlog.take()) is not None:
            for item in items:
                if not isinstance(item, list):
                    self._guarded(item)
                    continue
                for event in item:
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
        if self._pending or self._healer.unassigned:
            # The partner of a rename may sit in the next read, and suspects wait until all is read.
            seq = self._barriers.request()
            if seq is None:
                self._settle_moves()
                self._healer.heal(None)
            elif self._healer.unassigned:
                self._healer.assign(seq)
            self._healer.unassigned = False
        self._hand_off()
        self._refresh_state()

    def _hand_off(self) -> None:
        if self._out:
            out = self._out.copy()
            self._out.clear()  # in place: the healer appends to the same list
            self._on_hints(out)

    def _handle(self, wd: int, mask: int, cookie: int, name: bytes) -> None:
        if wd == self._barriers.wd:
            seen = self._barriers.passed(mask, name)
            if seen is not None:
                self._on_barrier(seen)
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
        node = self._tree.by_wd(wd)
        if node is None:
            for index in self._parents.concerned(wd, mask, name) or ():
                self._check_root(index)
            return  # or a watch already dropped: its late events describe nothing in the tree
        if mask & IN.IN_IGNORED:
            self._watch_removed(node)
            return
        if not name:
            if node.is_root and mask & (IN.IN_DELETE_SELF | IN.IN_UNMOUNT | IN.IN_MOVE_SELF):
                self._check_root(node.root)
            elif mask & (IN.IN_DELETE_SELF | IN.IN_UNMOUNT):
                self._self_gone(node)
            return
        if self._pending and not (mask & IN.IN_MOVED_TO and cookie in self._pending):
            self._settle_moves()
        where = self._tree.where(node)
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
            self._healer.attach(node, name)
        elif mask & IN.IN_DELETE:
            self._child_deleted(node, name)
        elif mask & IN.IN_ATTRIB:
            child = node.children.get(name)
            if child is None or child.wd is None:  # a permission change may have made it watchable
                self._healer.attach(node, name)

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
                self._healer.attach(parent, name)
            return
        child = src.child
        if not is_dir or child is None:
            self._out.append(Move(parent.root, src.path, rel, is_dir, None))
            if is_dir:
                self._healer.attach(parent, name)
            return
        if self._tree.ident_at(parent, name) == child.ident:
            self._out.append(Move(parent.root, src.path, rel, True, child.ino))
            self._healer.place(parent, name, child)
            if self._rules.path_dependent:
                self._healer.suspect(child, deep=True)  # what is ignored below it may differ at its new place
            return
        # The node we hold for the old name is not what moved: a newer directory took the name while we
        # lagged, or the one that moved has moved on. Let the pipeline check the disk, and look again.
        self._out.append(Move(parent.root, src.path, rel, True, None))
        if self._tree.ident_at(src.parent, src.name) != child.ident:
            self._healer.displace(child)
        self._healer.suspect(src.parent)
        self._healer.suspect(parent)

    def _settle_moves(self) -> None:
        """Renames whose partner never came: moved out of every watched tree."""
        pending, self._pending = self._pending, {}
        for move in pending.values():
            if not move.ignored:
                self._moved_out(move)

    def _moved_out(self, move: _PendingMove) -> None:
        self._out.append(Touch(move.parent.root, move.path))
        child = move.child
        if child is None or move.parent.children.get(move.name) is not child:
            return
        if self._tree.ident_at(move.parent, move.name) == child.ident:
            # Still at that name: what left it is another directory. A RENAME_EXCHANGE read late gives both
            # halves at once, and the half read first already watched the newcomer there (the one that left
            # was displaced then); dropping it would leave the name unwatched.
            return
        self._healer.drop(child)

    def _child_deleted(self, parent: Node, name: bytes) -> None:
        child = parent.children.get(name)
        if child is not None and self._tree.ident_at(parent, name) != child.ident:
            self._healer.drop(child)

    def _self_gone(self, node: Node) -> None:
        """IN_DELETE_SELF: the directory was removed (its parent's IN_DELETE follows)."""
        where = self._tree.where(node)
        if where is not None:
            self._out.append(Touch(node.root, where))
        self._healer.drop(node)

    def _watch_removed(self, node: Node) -> None:
        """IN_IGNORED for a watch we still hold: the kernel dropped it without our asking (a file system
        unmounted, a deletion we had not read of). Look again at its parent."""
        self._tree.watch_lost(node)
        if node.is_root:
            self._check_root(node.root, watch_lost=True)
            return
        where = self._tree.where(node)
        parent = node.parent
        if where is not None and parent is not None:
            self._out.append(Touch(node.root, where))
            self._healer.suspect(parent)
        self._healer.drop(node)

    # Roots and mounts ------------------------------------------------------------------------------

    def _watch_root(self, index: int) -> None:
        """Watch the directory at root `index`'s path by itself, and everything below it. Raises OSError
        (Starved when out of descriptors)."""
        root = self._tree.roots[index]
        try:
            fd = self._tree.open_root(index)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise Starved(exc.strerror) from exc
            raise OSError(exc.errno, exc.strerror, os.fsdecode(root)) from None
        st = os.fstat(fd)
        wd = self._inotify.watch_fd(fd, WATCH_MASK)
        if wd < 0:
            self._tree.remove_root(index)
            raise OSError(-wd, f"cannot watch: {self._healer.watch_error(-wd)}", os.fsdecode(root))
        try:
            self._healer.walk_new(self._tree.add_root(index, wd, st), fd)
        except OSError as exc:
            self._healer.drop_root(index)
            if exc.errno in RESOURCE_ERRNOS:
                raise Starved(exc.strerror) from exc
            raise OSError(exc.errno, exc.strerror, os.fsdecode(root)) from None

    def _check_root(self, index: int, *, watch_lost: bool = False) -> None:
        """Is the directory at root `index`'s path still the one the tree holds there, watched? If not,
        that one's watches go (what it holds is no longer at this path: a renamed root's changes are not
        this root's), the directory there now, if any, is watched by itself, and the pipeline reads the
        root from its path again: `deleted` for what is no longer there, `created` for what is, after a
        `gap`. While nothing is there the root is reported gone (degraded, not unready)."""
        self._parents.arm(index)
        node = self._tree.root_nodes[index]
        now = ident_at(self._tree.roots[index])
        if node is not None and not watch_lost and node.ident == now:
            return
        if node is None and now is None:
            return  # still gone
        root = os.fsdecode(self._tree.roots[index])
        self._settle_moves()
        if node is not None:
            self._healer.drop_root(index)
        back = False
        if now is not None:
            try:
                self._watch_root(index)
                back = True
            except Starved:
                raise
            except OSError as exc:
                log.error("watch_root_unwatchable", root=root, error=exc.strerror, note="tried again at the next check")
        if back:
            self.state.roots_reestablished += 1
            if root in self.state.roots_gone:
                self.state.roots_gone.remove(root)
            log.warning("watch_root_back", root=root, note="watched again; what is there now is recorded")
        elif node is None:
            return  # still gone: what is there could not be watched
        elif root not in self.state.roots_gone:
            self.state.roots_gone.append(root)
            log.error("watch_root_gone", root=root, hint="codi2 watches it again once a directory is back at that path")
        self._out.append(RootReplaced(index))

    def check_roots(self) -> None:
        """Handler thread (through `request`): check every root at its path."""
        for index in range(len(self._tree.roots)):
            self._check_root(index)
        self._hand_off()
        self._refresh_state()

    def _request_check_roots(self) -> None:
        self.request(self.check_roots)

    def _request_mounts_changed(self, points: list[bytes]) -> None:
        self.request(lambda: self.mounts_changed(points))

    def mounts_changed(self, points: list[bytes]) -> None:
        """Handler thread: a mount appeared or went at each of `points` (absolute paths). What those paths
        show changed without an event: check the roots (a mount over one, or above it, replaces it), and
        recrawl the directory that holds each point inside a root, which watches the new directory there
        (the watch below a mount stays on the covered one) and diffs it against the index."""
        self.check_roots()
        touched = False
        for point in points:
            for index, real in enumerate(self._real_roots):
                rel = _below(point, real)
                root = self._tree.root_nodes[index]
                if rel and root is not None:
                    touched = self._recrawl_mount_point(root, rel) or touched
        if touched:
            if self._on_mounts_changed is not None:
                self._on_mounts_changed()
            self._hand_off()
            self._refresh_state()

    def _recrawl_mount_point(self, root: Node, rel: bytes) -> bool:
        """Recrawl what holds mount point `rel`: its parent's listing when the parent is watched (a mount
        over a file or a directory there), else the tree of the nearest watched directory above it."""
        node, parts = root, rel.split(b"/")
        for depth, part in enumerate(parts[:-1]):
            if self._rules.ignored(root.root, b"/".join(parts[: depth + 1]), True):
                return False
            child = node.children.get(part)
            if child is None or child.wd is None:
                self._healer.recrawl(node, recursive=True)
                return True
            node = child
        if self._rules.ignored(root.root, rel, True) and self._rules.ignored(root.root, rel, False):
            return False
        self._healer.recrawl(node, recursive=False)
        return True

    # Barriers and recovery -------------------------------------------------------------------------

    def _on_barrier(self, seen: int) -> None:
        """Everything queued before barrier `seen` has been read: act on what waited for it."""
        self._settle_moves()
        self._healer.heal(seen)
        self._hand_off()
        self._barriers.wake()

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
        self._healer.retry_unwatched()
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
        for node in self._tree.root_nodes:
            if node is not None:
                self._healer.recrawl(node, recursive=True)
        # Everything asked of a barrier so far is settled by this recrawl: some of those barriers' own
        # events may have been dropped with the rest.
        self._barriers.settle_all()
        self._healer.settle()
        self._hand_off()
        self._barriers.wake()

    def _starved(self, exc: Starved) -> None:
        if not self.state.out_of_descriptors:
            log.error(
                "watcher_out_of_descriptors",
                error=str(exc),
                hint="raise the open-file limit (nofile); every tree is recrawled when descriptors are back",
            )
        self.state.out_of_descriptors = True

    def _refresh_state(self) -> None:
        self.state.watches = self._tree.watches
        unwatched = self._tree.unwatched_report()
        if unwatched is not None:
            self.state.unwatched = unwatched


class Healer:
    """Growing the tree and mending it: watches placed on new directories (and the walk below them), and
    the recrawls of what the watcher cannot vouch for. Suspect and displaced directories wait for a
    barrier (`assign`), so that everything queued about them is read before they are looked at again.
    Hints go to the watcher's `out`, in order with its own. Handler thread only, as the tree."""

    def __init__(self, tree: Tree, inotify: Inotify, rules: IgnoreRules, state: WatcherState, out: list[Hint]) -> None:
        self._tree = tree
        self._inotify = inotify
        self._rules = rules
        self._state = state
        self._out = out
        # Work that waits for a barrier: {node: barrier seq, 0 until one is requested}.
        self._suspects: dict[Node, int] = {}
        self._deep_suspects: set[Node] = set()
        self._displaced: dict[Node, int] = {}
        self.unassigned = False  # some of them wait for a barrier not yet requested

    def assign(self, seq: int) -> None:
        """Barrier `seq` was requested: what waits for one is looked at once it has been read."""
        for pending in (self._suspects, self._displaced):
            for node, assigned in pending.items():
                if not assigned:
                    pending[node] = seq

    def settle(self) -> None:
        """After every tree was recrawled: nothing waits any more, and what was displaced and not found
        again is forgotten."""
        self._suspects.clear()
        self._deep_suspects.clear()
        self._heal_displaced(None)

    def retry_unwatched(self) -> None:
        """Try every unwatched directory again, and ask for the tree of each one to be diffed."""
        for node in self._tree.unwatched():
            parent = node.parent
            if parent is None or self._tree.where(node) is None:
                self._tree.unmark_unwatched(node)
                continue
            try:
                pfd = self._tree.dir_fd(parent)
            except OSError:
                continue
            try:
                placed = self._retry(node, pfd)
            finally:
                os.close(pfd)
            where = self._tree.where(placed) if placed is not None else None
            if where is not None:
                self._out.append(Rescan(node.root, where, True))

    # Watches ---------------------------------------------------------------------------------------

    def attach(self, parent: Node, name: bytes) -> None:
        """Watch the directory at parent/name now and everything below it that is not ignored."""
        try:
            pfd = self._tree.dir_fd(parent)
        except OSError:
            self.suspect(parent)  # the parent itself moved: settle once everything is read
            return
        try:
            self._attach_at(parent, pfd, name)
        finally:
            os.close(pfd)

    def _attach_at(self, parent: Node, pfd: int, name: bytes, *, quiet: bool = False) -> Node | None:
        existing = parent.children.get(name)
        if existing is not None and existing.wd is None:  # an unwatched directory: this is its retry
            self._tree.detach(existing)
            self._tree.unmark_unwatched(existing)
            quiet = True
            existing = None
        try:
            fd = os.open(name, O_DIR, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in ABSENT_ERRNOS:
                if existing is not None:
                    self.displace(existing)  # gone or no longer a directory: its events will say where
                return None
            return self._unwatched_at(parent, pfd, name, exc.strerror or str(exc), quiet=quiet)
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            if self._rules.private_dir(*ident):
                return None  # the daemon's own state dir under another name: never watched
            if existing is not None and existing.ident == ident and existing.wd is not None:
                return existing  # already watched (a recrawl found it before its event was read)
            known = self._tree.by_ident(ident)
            if known is not None and known.wd is not None and known is not existing:
                # A directory we watch, found at a new place: take it there and diff its whole tree.
                old_parent = known.parent if self._tree.where(known) is not None else None
                self.place(parent, name, known)
                self._displaced.pop(known, None)
                if old_parent is not None:
                    self.suspect(old_parent)
                self._out.append(Rescan(known.root, self._tree.where(known) or b"", True))
                return known
            if existing is not None:
                self.displace(existing)
            wd = self._inotify.watch_fd(fd, WATCH_MASK)
            if wd < 0:
                return self._unwatched_node(parent, name, st, self.watch_error(-wd), quiet=quiet)
            node = Node(parent.root, parent, name, wd, st.st_dev, st.st_ino)
            self._tree.register(node)
            self.place(parent, name, node)
            try:
                self.walk_new(node, fd)
            except OSError as exc:  # its own listing
                self.drop(node)
                return self._unwatched_node(parent, name, st, exc.strerror or str(exc), quiet=quiet)
            # Watched from now on: what it holds must be looked at after this moment, whatever a walk of
            # its parent saw before (the pipeline walks a directory it is told was created).
            self._out.append(Touch(parent.root, self._tree.where(node) or b"", True, True))
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
        self.place(parent, name, node)
        self._tree.mark_unwatched(node)
        if not quiet:
            log.warning("directory_unwatched", path=os.fsdecode(self._tree.where(node) or b""), reason=reason)
        return node

    @staticmethod
    def watch_error(code: int) -> str:
        if code == errno.ENOSPC:
            return "inotify watch limit reached: raise fs.inotify.max_user_watches"
        return os.strerror(code)

    def walk_new(self, top: Node, top_fd: int) -> None:
        """Watch every non-ignored directory below a newly watched one, depth first, holding one
        descriptor per level: depth is unlimited, and the walk never leaves through a symlink. A
        directory below it that cannot be listed (out of descriptors) is left unwatched, so it is reported
        and tried again; raises OSError when `top` itself cannot be."""
        stack: list[tuple[Node, int, bytes, list[tuple[bytes, bool | None, int]]]] = []
        try:
            entries = list_dir(top_fd)
            stack.append((top, os.dup(top_fd), self._tree.where(top) or b"", entries))
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
                wd = self._inotify.watch_fd(cfd, WATCH_MASK)
                if wd < 0:
                    os.close(cfd)
                    self._unwatched_node(node, name, st, self.watch_error(-wd), quiet=False)
                    continue
                child = Node(node.root, node, name, wd, st.st_dev, st.st_ino)
                self._tree.register(child)
                self.place(node, name, child)
                try:
                    entries = list_dir(cfd)
                except OSError as exc:
                    os.close(cfd)
                    self.drop(child)
                    self._unwatched_node(node, name, st, exc.strerror or str(exc), quiet=False)
                    continue
                stack.append((child, cfd, rel, entries))
        finally:
            for _, fd, _, _ in stack:
                os.close(fd)

    # Tree changes ----------------------------------------------------------------------------------

    def place(self, parent: Node, name: bytes, node: Node) -> None:
        """Put `node` at parent/name, taking it from wherever it was; what was there is displaced."""
        old = self._tree.place(parent, name, node)
        if old is not None:
            self.displace(old)

    def displace(self, node: Node) -> None:
        """Out of the tree, kept by inode until the next barrier: a recrawl may find it elsewhere."""
        parent = node.parent
        self._tree.orphan(node)
        if node not in self._displaced:
            self._displaced[node] = 0
            self.unassigned = True
        if parent is not None:
            self.suspect(parent)

    def drop(self, node: Node) -> None:
        """Forget a directory and everything below it, removing their watches."""
        self._release(*self._tree.forget(node))

    def drop_root(self, index: int) -> None:
        """Forget root `index`'s directory and everything below it, removing their watches."""
        self._release(*self._tree.remove_root(index))

    def _release(self, nodes: list[Node], released: list[int]) -> None:
        for n in nodes:
            self._displaced.pop(n, None)
            self._suspects.pop(n, None)
        for wd in released:
            self._inotify.unwatch(wd)

    def suspect(self, node: Node, *, deep: bool = False) -> None:
        if deep:
            self._deep_suspects.add(node)
        if node not in self._suspects:
            self._suspects[node] = 0
            self.unassigned = True

    # Healing ---------------------------------------------------------------------------------------

    def heal(self, seen: int | None) -> None:
        """Recrawl the suspects whose barrier has passed, and those found in the read this barrier ends
        (a little early at worst, and everything is checked against the disk again): whoever waits on a
        barrier then sees the tree healed. Then forget the displaced directories no recrawl found again."""
        due = [n for n, s in self._suspects.items() if seen is None or s <= seen]
        for node in due:
            del self._suspects[node]
        for node in due:
            deep = node in self._deep_suspects
            self._deep_suspects.discard(node)
            if self._tree.where(node) is not None:
                self.recrawl(node, recursive=deep)
        self._heal_displaced(seen)

    def _heal_displaced(self, seen: int | None) -> None:
        lost = [n for n, s in self._displaced.items() if seen is None or 0 < s <= seen]
        for node in lost:
            self._displaced.pop(node, None)
            if self._tree.where(node) is None:
                self.drop(node)

    def recrawl(self, top: Node, *, recursive: bool) -> None:
        """List directories again, match their subdirectories to nodes by inode, watch what is new and
        displace what is gone; then ask the pipeline to diff the same tree against the index."""
        node = top
        while True:  # the first ancestor that is still where the tree says
            try:
                os.close(self._tree.dir_fd(node))
                break
            except OSError:
                parent = node.parent
                if node.is_root or parent is None:
                    return
                self.displace(node)
                node, recursive = parent, True
        self._state.recrawls += 1
        stack = [node]
        while stack:
            current = stack.pop()
            try:
                fd = self._tree.dir_fd(current)
            except OSError:
                continue
            try:
                self._relist(current, fd, stack if recursive else None)
            finally:
                os.close(fd)
        where = self._tree.where(node)
        if where is not None:
            self._out.append(Rescan(node.root, where, recursive))

    def _relist(self, node: Node, fd: int, descend: list[Node] | None) -> None:
        try:
            listing = list_dir(fd)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise Starved(exc.strerror) from exc
            log.warning("directory_unlistable", path=os.fsdecode(self._tree.where(node) or b""), error=exc.strerror)
            return
        where = self._tree.where(node) or b""
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
                self.displace(child)

    def _retry(self, node: Node, parent_fd: int) -> Node | None:
        """Try again to watch a directory that could not be watched before."""
        parent = node.parent
        assert parent is not None
        placed = self._attach_at(parent, parent_fd, node.name)
        if placed is not None and placed.wd is not None:
            log.info("directory_watched", path=os.fsdecode(self._tree.where(placed) or b""))
        return placed


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


def _below(path: bytes, top: bytes) -> bytes | None:
    """`path` relative to `top` (b"" for `top` itself); None when it is not below it."""
    if path == top:
        return b""
    prefix = top.rstrip(b"/") + b"/"
    return path[len(prefix) :] if path.startswith(prefix) else None
