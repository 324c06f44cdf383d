"""watcher thread → ChangeQueue → coalesce → enrich → spool (+ index) → shipper → sink.

The batch window is the coalescing window: repeated writes to a file within it become one event, a
create followed by writes stays one `created` carrying the final size and hash, and order per path is
kept. Stat, hashing, spool writes and index updates run in one worker thread (in order), sink calls in
another, so the event loop never blocks. A batch counts as observed once it is fsynced in the spool;
the shipper then commits it, retrying with back-off for as long as the store is down.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog

from codi2 import index as scanning
from codi2.events import Batch, EntryType, Event, Origin, parse_time, rfc3339, rfc3339_ns, uuid7
from codi2.index import FileIndex
from codi2.metrics import Metrics
from codi2.sinks import Sink
from codi2.spool import DiskSpool, Facts, SpooledBatch, SpoolFullError
from codi2.watcher import Change, IgnoreRules

log = structlog.get_logger("codi2.pipeline")

RECENT_PATHS = 100_000
RETRY_MAX_S = 5.0


@dataclass(frozen=True, slots=True)
class Identity:
    tenant_id: str
    user_id: str
    session_id: str | None
    pod: str


@dataclass(frozen=True, slots=True)
class Rescan:
    """Diff these (root index, relative dir) trees against the index, in order with live changes;
    with `baseline`, record them in the index as the starting state instead."""

    origin: Origin
    trees: tuple[tuple[int, bytes], ...]
    baseline: bool = False
    initial: bool = False


QueueItem = Change | Rescan


class ChangeQueue:
    """Hands changes from the watcher thread to the event loop; `put` blocks when full (back-pressure)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_items: int) -> None:
        self._loop = loop
        self._max = max_items
        self._items: deque[QueueItem] = deque()
        self._cond = threading.Condition()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: list[QueueItem]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) < self._max or self._closed)
            was_empty = not self._items
            self._items.extend(items)
        if was_empty:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self, timeout: float | None) -> list[QueueItem]:
        """Everything queued, waiting up to `timeout` for something to arrive."""
        if not self._items and not self._closed:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return []
        with self._cond:
            self._ready.clear()
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        return items

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._loop.call_soon_threadsafe(self._ready.set)


class Window:
    """Changes of one batch window, coalesced per (root, path) without reordering any path."""

    def __init__(self) -> None:
        self.items: list[Change] = []
        self._last: dict[tuple[int, bytes], Change] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, change: Change) -> None:
        key = (change.root, change.path)
        last = self._last.get(key)
        if last is not None and last.action in ("created", "updated"):
            if change.action == "updated":
                last.ts = change.ts  # writes fold into the create or update before them
                return
            if change.action == "created" and last.action == "created":
                return  # the same creation seen twice: by inotify and by the walk of a new directory
        self.items.append(change)
        self._last[key] = change
        if change.dest is not None:
            self._last[(change.root, change.dest)] = change

    def take(self) -> list[Change]:
        items, self.items = self.items, []
        self._last.clear()
        return items


@dataclass(slots=True)
class _Facts:
    type: EntryType
    size: int | None = None
    mode: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    inode: int | None = None

    def state(self) -> tuple[object, ...]:
        return (self.type, self.size, self.mode, self.mtime_ns, self.sha256, self.inode)


def _facts(path: bytes, is_dir: bool, hash_max_bytes: int) -> _Facts:
    """What the path is now, never following a symlink and never blocking on a FIFO."""
    try:
        st = os.lstat(path)
    except OSError:
        return _Facts("dir" if is_dir else "file")
    kind: EntryType = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"
    facts = _Facts(kind, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, None, st.st_ino)
    if stat.S_ISREG(st.st_mode) and st.st_size <= hash_max_bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return facts
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(fd)
            if stat.S_ISREG(fst.st_mode) and fst.st_size <= hash_max_bytes:
                facts.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
                facts.size = fst.st_size
                facts.mtime_ns = fst.st_mtime_ns
                facts.inode = fst.st_ino
    if kind == "dir":
        facts.size = None  # a directory's size says nothing about its content
    return facts


@dataclass
class StoreHealth:
    """Written by the shipper, read by /status: the store's state never touches readiness."""

    state: str = "unknown"
    error: str | None = None
    error_code: str | None = None
    since: float = field(default_factory=time.time)
    last_commit: float | None = None
    consecutive_failures: int = 0


class Pipeline:
    def __init__(
        self,
        *,
        roots: list[bytes],
        rules: IgnoreRules,
        identity: Identity,
        sink: Sink,
        spool: DiskSpool,
        index: FileIndex,
        metrics: Metrics,
        max_events: int,
        max_bytes: int,
        max_delay_ms: int,
        hash_max_bytes: int,
    ) -> None:
        self._roots = roots
        self._root_names = [os.fsdecode(r) for r in roots]
        self._rules = rules
        self._identity = identity
        self._sink = sink
        self.spool = spool
        self.index = index
        self._metrics = metrics
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_delay = max_delay_ms / 1000
        self._hash_max = hash_max_bytes
        self._seq = itertools.count(1)
        self._window = Window()
        self._window_bytes = 0
        self._deadline: float | None = None
        self._last: OrderedDict[tuple[int, bytes], tuple[str, tuple[object, ...] | None]] = OrderedDict()
        self.store = StoreHealth()
        self.gaps = 0
        self._unrecorded_loss = 0
        self.queue: ChangeQueue | None = None
        self.initial_scan_done = asyncio.Event()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="codi2-io")
        self._store_io = ThreadPoolExecutor(1, thread_name_prefix="codi2-store")
        self._tasks: list[asyncio.Task[None]] = []

    # Life cycle ----------------------------------------------------------------------------------

    def start(self) -> Callable[[list[Change]], None]:
        """Start batching and shipping; returns the thread-safe function the watcher feeds."""
        loop = asyncio.get_running_loop()
        self.queue = ChangeQueue(loop, max_items=self._max_events * 8)
        self._tasks = [
            asyncio.create_task(self._batch_loop(), name="codi2-batcher"),
            asyncio.create_task(self._ship_loop(), name="codi2-shipper"),
        ]
        return self.queue.put  # type: ignore[return-value]

    def request_rescan(self, origin: Origin, trees: list[tuple[int, bytes]]) -> None:
        """Thread-safe: diff these trees against the index after every change queued so far."""
        if self.queue is not None and not self.queue.closed:
            self.queue.put([Rescan(origin, tuple(trees))])

    def request_initial_scan(self, trees: list[tuple[int, bytes]], *, baseline: bool) -> None:
        """The start-up walk: a baseline (first start) or the offline diff; sets `initial_scan_done`."""
        assert self.queue is not None
        self.queue.put([Rescan("offline", tuple(trees), baseline=baseline, initial=True)])

    def root_of(self, path: str) -> tuple[int, bytes] | None:
        """(root index, relative path) of an absolute path under a watch root."""
        raw = os.fsencode(path)
        for i, root in enumerate(self._roots):
            if raw == root:
                return i, b""
            if raw.startswith(root + b"/"):
                return i, raw[len(root) + 1 :]
        return None

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def stop(self, timeout: float) -> int:
        """Flush what was observed into the spool and ship what the store will take within `timeout`.
        Returns how many observed events could not even be spooled (the spool keeps the rest)."""
        assert self.queue is not None
        self.queue.close()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("pipeline_task_failed", task=task.get_name(), error=repr(task.exception()))
        unspooled = len(self.queue) + len(self._window)
        if unspooled:
            self._metrics.events_dropped.labels(reason="shutdown_timeout").inc(unspooled)
        self._io.shutdown(wait=True, cancel_futures=True)
        self._store_io.shutdown(wait=True)
        await asyncio.to_thread(self.spool.shutdown)
        return unspooled

    # Batching ------------------------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        assert self.queue is not None
        while True:
            timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            for item in await self.queue.get(timeout):
                if isinstance(item, Rescan):
                    await self._flush()
                    await self._rescan(item)
                else:
                    self._add(item)
            self._metrics.pipeline_queue.set(len(self.queue) + len(self._window))
            due = self._deadline is not None and time.monotonic() >= self._deadline
            if due or len(self._window) >= self._max_events or self._window_bytes >= self._max_bytes:
                await self._flush()
            if self.queue.closed and not self.queue:
                await self._flush()
                await self.spool.close()
                return

    def _add(self, change: Change) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + self._max_delay
        self._window.add(change)
        self._window_bytes += 200 + len(change.path) + len(change.dest or b"")

    async def _rescan(self, request: Rescan) -> None:
        self._metrics.rescans.labels(origin="baseline" if request.baseline else request.origin).inc()
        loop = asyncio.get_running_loop()
        changes = await loop.run_in_executor(self._io, self._diff_trees, request)
        if changes:
            log.warning("rescan_found_changes", origin=request.origin, changes=len(changes))
        for change in changes:
            self._add(change)
        if request.initial:
            self.initial_scan_done.set()

    def _diff_trees(self, request: Rescan) -> list[Change]:
        """Worker thread: the index is only written here too, so the diff sees a consistent index."""
        now = time.time()
        out: list[Change] = []
        for root, top in request.trees:
            disk = dict(scanning.walk(self._roots[root], top, self._rules))
            if request.baseline:
                self.index.baseline(self._root_names[root], disk)
                log.info("baseline_recorded", root=self._root_names[root], entries=len(disk))
                continue
            indexed = self.index.entries(self._root_names[root], top)
            out += scanning.diff(root, disk, indexed, request.origin, now)
        return out

    async def _flush(self) -> None:
        items = self._window.take()
        self._window_bytes = 0
        self._deadline = None
        if not items and not self._unrecorded_loss:
            return
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._io, self._prepare, items)
        events: list[Event] = []
        facts: list[Facts] = []
        for change, fact in prepared:
            event = self._make_event(change, fact)
            if event is not None:
                events.append(event)
                facts.append((fact.inode, fact.mtime_ns))
        if self._unrecorded_loss:
            events.append(self._gap_event(self._unrecorded_loss))
            facts.append((None, None))
        start = 0
        size = 0
        for i, event in enumerate(events):
            size += event.encoded_size()
            if i + 1 - start >= self._max_events or size >= self._max_bytes or i + 1 == len(events):
                await self._persist(events[start : i + 1], facts[start : i + 1], size)
                start, size = i + 1, 0

    def _prepare(self, items: list[Change]) -> list[tuple[Change, _Facts]]:
        """Worker thread: facts for each change; a directory that left the tree brings a `deleted` for
        every entry the index still holds below it, deepest first."""
        out: list[tuple[Change, _Facts]] = []
        gone: set[tuple[int, bytes]] = set()
        for c in items:
            if c.action == "deleted":
                if c.is_dir:
                    for child, kind in self.index.below(self._root_names[c.root], c.path):
                        if (c.root, child) not in gone:
                            gone.add((c.root, child))
                            child_change = Change("deleted", c.root, child, None, kind == "dir", c.ts, c.origin)
                            out.append((child_change, _Facts(kind)))  # type: ignore[arg-type]
                gone.add((c.root, c.path))
                out.append((c, _Facts("dir" if c.is_dir else "file")))
                continue
            gone.discard((c.root, c.path))
            rel = c.dest if c.dest is not None else c.path
            out.append((c, _facts(os.path.join(self._roots[c.root], rel), c.is_dir, self._hash_max)))
        return out

    def _make_event(self, c: Change, facts: _Facts) -> Event | None:
        """Assign id and seq, dropping what adds nothing to the trail: the same state reported twice
        (inotify and a walk, or a rescan and a late live event), or a second delete."""
        key = (c.root, c.path)
        action = c.action
        last = self._last.get(key)
        if action in ("created", "updated"):
            state = facts.state()
            if last is not None and last[0] in ("created", "updated") and last[1] is not None:
                if last[1] == state:
                    return None
                if action == "created" and last[1][-1] == facts.inode:
                    action = "updated"  # the same file (same inode) cannot be created twice
            self._remember(key, action, state)
        elif action == "deleted":
            if last is not None and last[0] == "deleted":
                return None
            self._remember(key, "deleted", None)
        else:
            self._last.pop(key, None)
            if c.dest is not None:
                self._remember((c.root, c.dest), "updated", facts.state())
        return self._event(
            ts=c.ts,
            action=action,
            path=os.fsdecode(c.path),
            dest_path=os.fsdecode(c.dest) if c.dest is not None else None,
            root=self._root_names[c.root],
            type=facts.type,
            size=facts.size,
            mode=facts.mode,
            mtime=rfc3339_ns(facts.mtime_ns) if facts.mtime_ns is not None else None,
            sha256=facts.sha256,
            origin=c.origin,
        )

    def _event(self, *, ts: float, **fields: Any) -> Event:
        """A new event with its id, its place in this daemon's sequence and the daemon's identity."""
        ident = self._identity
        return Event(
            id=uuid7(),
            seq=next(self._seq),
            ts=rfc3339(ts),
            tenant_id=ident.tenant_id,
            user_id=ident.user_id,
            session_id=ident.session_id,
            pod=ident.pod,
            **fields,
        )

    def _remember(self, key: tuple[int, bytes], action: str, state: tuple[object, ...] | None) -> None:
        self._last[key] = (action, state)
        self._last.move_to_end(key)
        if len(self._last) > RECENT_PATHS:
            self._last.popitem(last=False)

    def _gap_event(self, lost: int) -> Event:
        """A marker in the trail where events were lost (disk full): `size` holds how many."""
        return self._event(
            ts=time.time(),
            action="gap",
            path="",
            dest_path=None,
            root=self._root_names[0],
            type="dir",
            size=lost,
            mode=None,
            mtime=None,
            sha256=None,
            origin="live",
        )

    async def _persist(self, events: list[Event], facts: list[Facts], size: int) -> None:
        """Make the batch durable (spool, then index), then hand it to the shipper."""
        await self.spool.wait_for_room(size)
        loop = asyncio.get_running_loop()
        try:
            item = await loop.run_in_executor(self._io, self._append, events, facts)
        except SpoolFullError as exc:
            # The changes themselves are recovered by a rescan against the index once the disk has
            # room; what is lost is their history, and a gap marker says so.
            lost = sum(1 for e in events if e.action != "gap")
            self._unrecorded_loss += lost
            for e in events:  # not in the trail, so a later report of the same state is no duplicate
                if e.action != "gap":
                    self._last.pop((self._root_names.index(e.root), os.fsencode(e.path)), None)
            self._metrics.events_dropped.labels(reason="spool_write_failed").inc(lost)
            log.error("events_lost", count=lost, error=str(exc), hint="free disk space under the state dir")
            self.request_rescan("rescan", [(i, b"") for i in range(len(self._roots))])
            return
        for gap in (e for e in events if e.action == "gap"):
            self.gaps += 1
            self._unrecorded_loss -= gap.size or 0
        for event in events:
            self._metrics.events_observed.labels(action=event.action).inc()
        await self.spool.publish(item)

    def _append(self, events: list[Event], facts: list[Facts]) -> SpooledBatch:
        item = self.spool.append(events, facts)
        self.index.apply(events, facts, (item.segment, item.end))
        return item

    # Shipping ------------------------------------------------------------------------------------

    async def _ship_loop(self) -> None:
        while (item := await self.spool.peek()) is not None:
            await self._commit(item.batch)
            oldest = min((e.ts for e in item.batch.events), default=None)
            if oldest is not None:
                lag = time.time() - parse_time(oldest).timestamp()
                self._metrics.event_commit_lag.set(max(lag, 0.0))
            await self.spool.ack(item)

    async def _commit(self, batch: Batch) -> None:
        """Retry until the store takes the batch: an outage delays events, it never drops them."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                await loop.run_in_executor(self._store_io, self._sink.write_batch, batch)
            except Exception as exc:
                self._store_failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._metrics.batch_commit_duration.observe(time.perf_counter() - started)
            self._metrics.events_committed.inc(len(batch.events))
            if self.store.state != "ok":
                if self.store.state == "degraded":
                    log.info("store_recovered", after_failures=self.store.consecutive_failures)
                self.store = StoreHealth(state="ok")
            self.store.last_commit = time.time()
            log.debug("batch_committed", batch_id=batch.batch_id, events=len(batch.events))
            return

    def _store_failed(self, exc: Exception) -> None:
        code = getattr(exc, "code", None) or type(exc).__name__
        self._metrics.store_errors.labels(error=code).inc()
        health = self.store
        if health.state != "degraded" or health.error_code != code:
            log.warning("store_unavailable", error=str(exc), code=code)
            self.store = health = StoreHealth(state="degraded", error=str(exc), error_code=code)
        health.consecutive_failures += 1
