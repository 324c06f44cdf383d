"""journal outbox → store: the shipper, and the store's health as /status and the metrics see it.

The shipper is one thread. It takes each batch the journal thread commits (in memory, or read back from
the outbox on a read-only connection when it fell behind), commits it to the store, and posts the batch's
number back to the journal (`Journal.post_ack`): the journal thread, the file's one writer, deletes what
the store holds. A store that is down is retried for as long as it takes: an outage delays events, it never
drops them. A batch the store can never take (a non-retryable error) makes the state *blocked*, with the batch
kept, rather than skipped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from codi2.journal.journal import Journal, is_corruption
from codi2.journal.outbox import OutboxBatch, OutboxReader
from codi2.metrics import Metrics
from codi2.stores.base import BatchWriter
from codi2.trail.events import Batch, parse_time, rfc3339

log = structlog.get_logger("codi2.ship.shipper")

RETRY_MAX_S = 5.0
SHIP_CHUNK = 16
HANDOFF_MAX = 32  # batches kept in memory for the shipper
# With nothing to ship the thread sleeps until woken (a committed batch, a new journal, a stop): this
# bound only limits what a missed wake-up could cost, and keeps an idle daemon from waking.
IDLE_WAIT_S = 60.0
RENEW_WAIT_S = 120.0  # bounds how long a journal recovery waits for a store write in flight


@dataclass
class StoreHealth:
    """The store's state as last seen; it never touches readiness."""

    state: str = "unknown"  # ok | degraded (retrying) | blocked (a batch that can never commit)
    error: str | None = None
    error_code: str | None = None
    since: float = field(default_factory=time.time)
    last_commit: float | None = None
    consecutive_failures: int = 0


class StoreMonitor:
    """What the store did with the last batch, from whichever thread wrote it: the shipper, or with
    SQLite the journal thread (the store is the journal's file)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.health = StoreHealth()

    def committed(self, events: int, seconds: float, oldest: str) -> None:
        m = self._metrics
        m.batch_commit_duration.observe(seconds)
        m.events_committed.inc(events)
        m.event_commit_lag.set(max(time.time() - parse_time(oldest).timestamp(), 0.0))
        if self.health.state != "ok":
            if self.health.state in ("degraded", "blocked"):
                log.info("store_recovered", after_failures=self.health.consecutive_failures)
            self.health = StoreHealth(state="ok")
            m.store_blocked.set(0)
        self.health.last_commit = time.time()

    def failed(self, exc: BaseException, code: str | None = None) -> None:
        code = code or str(getattr(exc, "code", None) or type(exc).__name__)
        retryable = getattr(exc, "retryable", True) is not False
        self._metrics.store_errors.labels(error=code).inc()
        state = "degraded" if retryable else "blocked"
        health = self.health
        if health.state != state or health.error_code != code:
            if retryable:
                log.warning("store_unavailable", error=str(exc), code=code)
            else:
                log.error("store_blocked", error=str(exc), code=code, hint="this batch can never commit as it is")
            self.health = health = StoreHealth(state=state, error=str(exc), error_code=code)
            self._metrics.store_blocked.set(0 if retryable else 1)
        health.consecutive_failures += 1

    def degraded(self) -> list[str]:
        h = self.health
        return [f"store {h.state}: {h.error_code}: {h.error}"] if h.state in ("degraded", "blocked") else []

    def snapshot(self, backend: str) -> dict[str, Any]:
        h = self.health
        return {
            "backend": backend,
            "state": h.state,
            "error": h.error,
            "error_code": h.error_code,
            "consecutive_failures": h.consecutive_failures,
            "since": rfc3339(h.since),
        }


class Shipper:
    """The thread that moves committed batches from the journal's outbox to the store."""

    def __init__(
        self,
        journal: Journal,
        sink: BatchWriter,
        monitor: StoreMonitor,
        *,
        on_batch_lost: Callable[[int, str], None],
        on_outbox_corrupt: Callable[[], None] = lambda: None,
    ) -> None:
        self._journal = journal
        self._sink = sink
        self._monitor = monitor
        self._on_batch_lost = on_batch_lost  # a batch that no longer checks out: its events are gone
        self._on_outbox_corrupt = on_outbox_corrupt  # the journal thread recovers the file (it may be idle)
        self._read_failing = False
        self._backlog = False  # replaying the outbox at the store's batch priority
        self._wake = threading.Condition()
        self._handoff: deque[OutboxBatch] = deque()
        self._renewed: Journal | None = None  # set (under _wake) once a recovered journal is committed
        self._stop = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="codi2-ship", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, deadline: float) -> None:
        """Blocking: ship what the store takes before `deadline` (monotonic), then return. What is left
        stays in the outbox for the next start."""
        with self._wake:
            self._stop = True
            self._deadline = deadline
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()) + 1)

    def hand(self, batch: OutboxBatch) -> None:
        """Journal thread: a batch just committed, in memory, so the shipper need not read it back."""
        with self._wake:
            self._handoff.append(batch)
            if len(self._handoff) > HANDOFF_MAX:  # the store is behind: those are read back later
                self._handoff.popleft()
            self._wake.notify_all()

    def renew(self, journal: Journal) -> None:
        """Journal thread: the journal was recovered into a new file; ship from its start, busy or not."""
        with self._wake:
            self._renewed = journal
            self._handoff.clear()
            self._wake.notify_all()
            # Blocking until the thread has let go of the old journal's batches (one in flight is abandoned,
            # or committed before this returns): the caller then reads the store to rebuild the index, and
            # an old batch landing after that read would be recorded twice (its changes diffed again).
            self._wake.wait_for(lambda: self._renewed is None or not self.running, RENEW_WAIT_S)

    def _from_handoff(self, after: int) -> list[OutboxBatch]:
        """The batches right after `after` that are still in memory, in order (none if there is a gap)."""
        with self._wake:
            while self._handoff and self._handoff[0].n <= after:
                self._handoff.popleft()
            out: list[OutboxBatch] = []
            while self._handoff and self._handoff[0].n == after + 1 + len(out) and len(out) < SHIP_CHUNK:
                out.append(self._handoff.popleft())
            return out

    def _loop(self) -> None:
        journal = self._journal
        reader = OutboxReader(journal.path)
        after = 0
        raced = False
        try:
            while True:
                with self._wake:
                    renewed, self._renewed = self._renewed, None
                    if renewed is not None:
                        self._wake.notify_all()  # renew() returns: the old journal's batches are let go
                if renewed is not None:
                    reader.close()
                    journal = self._journal = renewed
                    reader, after = OutboxReader(journal.path), 0
                failed = False
                try:
                    batches: list[OutboxBatch | tuple[int, str]] = list(self._from_handoff(after))
                    if not batches:
                        batches = reader.next_batches(after, SHIP_CHUNK)
                        self._draining(len(batches) == SHIP_CHUNK)  # a full chunk read back: this far behind, at least
                    else:
                        self._draining(False)
                except Exception as exc:
                    if not self._read_failing:  # once per streak: retried each second, possibly for long
                        log.warning("outbox_read_failed", error=str(exc))
                        if is_corruption(exc):
                            self._on_outbox_corrupt()
                    self._read_failing = True
                    batches, failed = [], True
                else:
                    if self._read_failing:
                        log.info("outbox_read_recovered")
                    self._read_failing = False
                if not batches:
                    with self._wake:
                        # A batch handed over (or a journal renewed) while we read goes round at once, even
                        # when stopping: its notice came before we waited. Once only: should the outbox not
                        # show a batch handed over, that is retried each second, like a failed read.
                        if (self._handoff and not raced) or self._renewed is not None:
                            raced = True
                            continue
                        if self._stop:
                            return
                        self._wake.wait(1.0 if self._handoff or failed else IDLE_WAIT_S)
                    continue
                raced = False
                for b in batches:
                    if self._renewed is not None:  # the rest are the old journal's
                        break
                    if isinstance(b, tuple):
                        n, reason = b
                        self._on_batch_lost(n, reason)
                    else:
                        done = self._deliver(b)
                        if done == "stopped":
                            return
                        if done == "renewed":  # the old journal's batch: salvaged into the new one, or lost
                            break
                        n = b.n
                    journal.post_ack(n)  # a lost batch too: its row goes, the gap says what it held
                    after = n
        except Exception:
            log.exception("shipper_failed")
        finally:
            reader.close()

    def _draining(self, backlog: bool) -> None:
        """Tell the store when shipping turns into a backlog replay (a full chunk read back from the outbox:
        the in-memory handoff fell behind) and back, so a shared store can serve it after live traffic."""
        if backlog != self._backlog:
            self._backlog = backlog
            log.info("store_backlog", draining=backlog)
            self._sink.draining_backlog(backlog)

    def _deliver(self, item: OutboxBatch) -> str:
        """Retry until the store takes the batch ("done"). "stopped" when stopping past the deadline with
        the store still refusing: the batch stays in the outbox; "renewed" when the journal was recovered
        meanwhile: the batch is the old journal's, and is not shipped from there."""
        batch = Batch(item.batch_id, item.events, item.header)
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                self._sink.write_batch(batch)
            except Exception as exc:
                self._monitor.failed(exc)
                with self._wake:
                    if self._stop and time.monotonic() >= self._deadline:
                        return "stopped"
                    if self._wake.wait_for(lambda: self._renewed is not None, delay):
                        return "renewed"
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._monitor.committed(len(batch.events), time.perf_counter() - started, min(e.ts for e in batch.events))
            return "done"
