"""watcher thread → ChangeQueue → coalesce → enrich → batch → spool → shipper → sink.

The batch window is the coalescing window: repeated writes to a file within it become one event, a
create followed by writes stays one `created` carrying the final size and hash, and order per path is
kept. Stat and hashing run in a worker thread, sink calls in another, so the event loop never blocks.
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

import structlog

from codi2.events import Batch, EntryType, Event, rfc3339, rfc3339_ns, uuid7
from codi2.metrics import Metrics
from codi2.sinks import Sink
from codi2.spool import MemorySpool
from codi2.watcher import Change

log = structlog.get_logger("codi2.pipeline")

RECENT_CREATES = 100_000
RETRY_MAX_S = 5.0


@dataclass(frozen=True, slots=True)
class Identity:
    tenant_id: str
    user_id: str
    session_id: str | None
    pod: str


class ChangeQueue:
    """Hands changes from the watcher thread to the event loop; `put` blocks when full (back-pressure)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_items: int) -> None:
        self._loop = loop
        self._max = max_items
        self._items: deque[Change] = deque()
        self._cond = threading.Condition()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, changes: list[Change]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) < self._max or self._closed)
            was_empty = not self._items
            self._items.extend(changes)
        if was_empty:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self, timeout: float | None) -> list[Change]:
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


@dataclass(slots=True)
class _Pending:
    change: Change
    wrote: bool = False


class Window:
    """Changes of one batch window, coalesced per (root, path) without reordering any path."""

    def __init__(self) -> None:
        self.items: list[_Pending] = []
        self._last: dict[tuple[int, bytes], _Pending] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, change: Change) -> None:
        key = (change.root, change.path)
        last = self._last.get(key)
        if last is not None and last.change.action in ("created", "updated"):
            if change.action == "updated":
                last.wrote = True
                last.change.ts = change.ts
                return
            if change.action == "created" and last.change.action == "created":
                return  # the same creation seen twice: by inotify and by the walk of a new directory
        pending = _Pending(change)
        self.items.append(pending)
        self._last[key] = pending
        if change.dest is not None:
            self._last[(change.root, change.dest)] = pending

    def take(self) -> list[_Pending]:
        items, self.items = self.items, []
        self._last.clear()
        return items


@dataclass(slots=True)
class _Facts:
    type: EntryType
    size: int | None = None
    mode: int | None = None
    mtime: str | None = None
    sha256: str | None = None
    inode: int | None = None


def _facts(path: bytes, is_dir: bool, hash_max_bytes: int) -> _Facts:
    """What the path is now, never following a symlink and never blocking on a FIFO."""
    try:
        st = os.lstat(path)
    except OSError:
        return _Facts("dir" if is_dir else "file")
    facts = _Facts(
        "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file",
        st.st_size,
        stat.S_IMODE(st.st_mode),
        rfc3339_ns(st.st_mtime_ns),
        None,
        st.st_ino,
    )
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
                facts.mtime = rfc3339_ns(fst.st_mtime_ns)
                facts.inode = fst.st_ino
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
        identity: Identity,
        sink: Sink,
        metrics: Metrics,
        max_events: int,
        max_bytes: int,
        max_delay_ms: int,
        max_pending_batches: int,
        hash_max_bytes: int,
    ) -> None:
        self._roots = roots
        self._root_names = [os.fsdecode(r) for r in roots]
        self._identity = identity
        self._sink = sink
        self._metrics = metrics
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_delay = max_delay_ms / 1000
        self._hash_max = hash_max_bytes
        self._seq = itertools.count(1)
        self._window = Window()
        self._window_bytes = 0
        self._deadline: float | None = None
        self._recent_creates: OrderedDict[tuple[int, bytes], int | None] = OrderedDict()
        self.spool = MemorySpool(max_pending_batches)
        self.store = StoreHealth()
        self.queue: ChangeQueue | None = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="codi2-stat")
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
        return self.queue.put

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def stop(self, timeout: float) -> int:
        """Flush everything observed so far to the store. Returns how many events could not be committed."""
        assert self.queue is not None
        self.queue.close()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("pipeline_task_failed", task=task.get_name(), error=repr(task.exception()))
        lost = len(self.queue) + len(self._window) + self.spool.pending_events
        if lost:
            self._metrics.events_dropped.labels(reason="shutdown_timeout").inc(lost)
        self._io.shutdown(wait=False, cancel_futures=True)
        self._store_io.shutdown(wait=True)
        return lost

    # Batching ------------------------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        assert self.queue is not None
        while True:
            timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            changes = await self.queue.get(timeout)
            for change in changes:
                if self._deadline is None:
                    self._deadline = time.monotonic() + self._max_delay
                self._window.add(change)
                self._window_bytes += 200 + len(change.path) + len(change.dest or b"")
            self._metrics.pipeline_queue.set(len(self.queue) + len(self._window))
            due = self._deadline is not None and time.monotonic() >= self._deadline
            if due or len(self._window) >= self._max_events or self._window_bytes >= self._max_bytes:
                await self._flush()
            if self.queue.closed and not self.queue:
                await self._flush()
                await self.spool.close()
                return

    async def _flush(self) -> None:
        items = self._window.take()
        self._window_bytes = 0
        self._deadline = None
        if not items:
            return
        loop = asyncio.get_running_loop()
        facts = await loop.run_in_executor(self._io, self._gather_facts, items)
        events = [e for e in map(self._make_event, items, facts) if e is not None]
        batch: list[Event] = []
        size = 0
        for event in events:
            self._metrics.events_observed.labels(action=event.action).inc()
            batch.append(event)
            size += event.encoded_size()
            if len(batch) >= self._max_events or size >= self._max_bytes:
                await self.spool.put(Batch(uuid7(), tuple(batch)))
                batch, size = [], 0
        if batch:
            await self.spool.put(Batch(uuid7(), tuple(batch)))
        self._metrics.pipeline_queue.set(len(self.queue or ()))

    def _gather_facts(self, items: list[_Pending]) -> list[_Facts]:
        out = []
        for item in items:
            c = item.change
            if c.action == "deleted":
                out.append(_Facts("dir" if c.is_dir else "file"))
                continue
            rel = c.dest if c.dest is not None else c.path
            out.append(_facts(os.path.join(self._roots[c.root], rel), c.is_dir, self._hash_max))
        return out

    def _make_event(self, item: _Pending, facts: _Facts) -> Event | None:
        c = item.change
        key = (c.root, c.path)
        action = c.action
        if action == "created":
            if key in self._recent_creates and self._recent_creates[key] == facts.inode:
                if not item.wrote:
                    return None  # a walk of a new directory and inotify both reported this creation
                action = "updated"
            self._recent_creates[key] = facts.inode
            if len(self._recent_creates) > RECENT_CREATES:
                self._recent_creates.popitem(last=False)
        else:
            self._recent_creates.pop(key, None)
            if c.dest is not None:
                self._recent_creates.pop((c.root, c.dest), None)
        ident = self._identity
        return Event(
            id=uuid7(),
            seq=next(self._seq),
            ts=rfc3339(c.ts),
            tenant_id=ident.tenant_id,
            user_id=ident.user_id,
            session_id=ident.session_id,
            pod=ident.pod,
            action=action,
            path=os.fsdecode(c.path),
            dest_path=os.fsdecode(c.dest) if c.dest is not None else None,
            root=self._root_names[c.root],
            type=facts.type,
            size=facts.size,
            mode=facts.mode,
            mtime=facts.mtime,
            sha256=facts.sha256,
        )

    # Shipping ------------------------------------------------------------------------------------

    async def _ship_loop(self) -> None:
        while (batch := await self.spool.peek()) is not None:
            await self._commit(batch)
            await self.spool.ack(batch)

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
