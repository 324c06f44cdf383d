"""The flush: the window's hints reconciled against the index and committed, a batch per transaction.

The journal thread (`codi2.pipeline.pipeline`) alone drives it. A batch's events and the index rows they
account for commit in one transaction, so a failure rolls both back and puts the hints back into the
window, in order, ahead of what arrived since. What failed decides what follows:

- the disk or the database (a full disk, no descriptors left): every hint is kept and tried again with
  back-off; once a flush works, a `journal_error` gap marks the history coarsened meanwhile;
- a damaged journal file: its owner recovers it (`on_corrupt`) and the index is rebuilt;
- anything else is a bug met by one change, which must not cost any other change its record. When the
  transaction held more than one change (the failure came while committing, or while writing index rows
  buffered by earlier changes), the window is bisected: each half is tried in transactions of its own
  until the one change that fails alone is found. Only that one is set aside, with a `pipeline_error`
  gap; its end state reaches the trail at the next diff of its place.

Gap causes taken into a transaction that rolls back are noted again, so the marker is not lost with it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from codi2.config import BatchingSettings
from codi2.disk.fs import RESOURCE_ERRNOS
from codi2.journal.journal import Journal, is_corruption
from codi2.journal.outbox import OutboxBatch
from codi2.metrics import Metrics
from codi2.pipeline.factory import EventFactory
from codi2.pipeline.lifecycle import Mark, mark_event, scanned_mark
from codi2.pipeline.reconcile import Reconciler
from codi2.pipeline.window import Window
from codi2.ship.shipper import StoreMonitor
from codi2.trail.events import Origin
from codi2.watch.hints import Hint, Rescan, RootReplaced

log = structlog.get_logger("codi2.pipeline.flusher")

JOURNAL_RETRY_MAX_S = 30.0
# How long /status stays degraded after a change was set aside: the window of the Codi2EventsDropped
# alert, so the status and the alert tell the same story.
PIPELINE_ERROR_DEGRADED_S = 15 * 60.0


class Gaps(Protocol):
    """Where the causes of `gap` events wait for the next batch (the pipeline's, thread-safe)."""

    def note_gap(self, reason: str, count: int | None) -> None: ...

    def take_gaps(self) -> dict[str, int]:
        """Every cause noted so far, with its count of changes; none is left waiting."""
        ...

    def note_mark(self, mark: Mark) -> None:
        """A lifecycle record for the head of the next batch (`codi2.pipeline.lifecycle`)."""
        ...

    def take_marks(self) -> list[Mark]: ...


@dataclass
class JournalHealth:
    """Written by the journal thread, read by /status."""

    state: str = "ok"  # ok | error (a write failed; retrying) | full (the outbox reached its limit)
    error: str | None = None
    since: float = field(default_factory=time.time)
    consecutive_failures: int = 0
    initial_scan: str = "pending"  # pending | running | done | waiting (for an index rebuild)
    rebuilds: int = 0


@dataclass(frozen=True)
class _Failure:
    """A transaction that rolled back: `hints[:done]` were committed before it (`hints[done]` maybe in
    part), `hints[done:reached]` had effects in it, the rest was not reached."""

    exc: Exception
    done: int
    reached: int


def environmental(exc: BaseException) -> bool:
    """A failure of the disk or the database (worth retrying), as opposed to a bug in handling one change."""
    return isinstance(exc, OSError | sqlite3.Error)


def _hint(exc: BaseException) -> str:
    """What an operator can do about a failing flush."""
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return "raise the open-file limit of the container (nofile) or free memory; the changes wait and are retried"
    return "free disk space under the state dir"


class Flusher:
    """Commits the window; `attach` gives it the journal (again after a recovery) before the first flush.

    `local_store` is the store's monitor when the journal's file is the store (SQLite): a commit is then the
    store's, and so is a failure. `reopen_root` is the owner of the roots' descriptors: it opens a root's path
    again and says whether a directory is there."""

    def __init__(
        self,
        window: Window,
        events: EventFactory,
        gaps: Gaps,
        metrics: Metrics,
        batching: BatchingSettings,
        *,
        local_store: StoreMonitor | None,
        on_corrupt: Callable[[Exception], None],
        reopen_root: Callable[[int], bool],
    ) -> None:
        self.window = window
        self._events = events
        self._gaps = gaps
        self._metrics = metrics
        self._max_events = batching.max_events
        self._max_batch_bytes = batching.max_bytes
        self._local_store = local_store
        self._on_corrupt = on_corrupt
        self._reopen_root = reopen_root
        self.on_committed: Callable[[OutboxBatch], None] = lambda batch: None  # the shipper's
        self.health = JournalHealth()
        self.retry_at = 0.0  # monotonic: no flush before then (a back-off)
        self._delay = 0.5
        self.gaps = 0  # gap events committed
        self.pipeline_errors = 0
        self.last_error: str | None = None
        self._last_error_at = 0.0  # monotonic
        self._last_error_wall = 0.0
        self._journal: Journal | None = None
        self._reconciler: Reconciler | None = None
        self._initial_pending = 0  # start-up root scans not yet committed
        self._initial_in_txn = 0  # of those, the ones applied in the open transaction
        self._initial_origin: Origin = "baseline"
        self._scan_changes = 0  # events the start-up diff committed
        self._scan_walked_from = 0  # the reconciler's walked entries when the start-up diff began
        self._scan_walked = 0  # entries it walked, once done
        self._scan_expected: int | None = None  # entries the index held when it began (None: a first start)

    def attach(self, journal: Journal, reconciler: Reconciler) -> None:
        self._journal, self._reconciler = journal, reconciler

    @property
    def reconciler(self) -> Reconciler | None:
        return self._reconciler

    def hashing(self) -> dict[str, object] | None:
        """The hash in progress, if any (a multi-GB file takes seconds): for /status."""
        return self._reconciler.hashing_status() if self._reconciler is not None else None

    def expect_initial(self, roots: int, origin: Origin = "offline") -> None:
        """A scan of every root is on its way (start-up, or after a rebuild): done once all are committed."""
        self._initial_pending = roots
        self._initial_origin = origin
        self._scan_changes = 0
        self._scan_walked_from = self._reconciler.entries_walked if self._reconciler is not None else 0
        self.health.initial_scan = "running"
        self._scan_expected = self._journal.count() if self._journal is not None and origin != "baseline" else None

    def retry_in(self, seconds: float) -> None:
        self.retry_at = time.monotonic() + seconds

    # The flush -----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Commit every hint of the window, setting aside none but one that fails alone with a bug."""
        hints = self.window.take()
        self._events.refresh_session()  # a batch cut: the session the events from now on carry
        segments = [hints]  # a stack: the next to try is the last, and each comes before those below it
        while segments:
            segment = segments.pop()
            failure = self._attempt(segment)
            if failure is None:
                continue
            rest = segment[failure.done :]
            suspects, tail = rest[: failure.reached - failure.done], segment[failure.reached :]
            if environmental(failure.exc) or not suspects:
                self.window.restore(rest + [h for later in reversed(segments) for h in later])
                self.failed(failure.exc)
                return
            if len(suspects) == 1:
                self._set_aside(suspects[0], failure.exc)
                segments.append(tail)  # even when empty: it commits the `gap` marking the place
                continue
            log.info("flush_bisected", changes=len(suspects), error=repr(failure.exc))
            half = len(suspects) // 2
            segments += [s for s in (tail, suspects[half:], suspects[:half]) if s]
        self._ok(len(hints))

    def _attempt(self, hints: list[Hint]) -> _Failure | None:
        """Apply `hints` in order and commit their events, a batch per transaction."""
        journal, rec = self._journal, self._reconciler
        assert journal is not None and rec is not None, "attached before the first flush"
        done = 0
        reached = len(hints)  # a failure before the first hint is applied may be any hint's
        taken: dict[str, int] = {}
        marks: list[Mark] = []
        try:
            journal.begin()
            rec.prefetch(hints)
            marks = self._mark_events(journal, rec)  # a run's `start` before any gap of the run
            taken = self._gap_events(rec)
            self._reopen_roots(rec, hints)
            for current, hint in enumerate(hints):
                reached = current + 1
                origin: Origin = "live"
                if isinstance(hint, RootReplaced):
                    hint = Rescan(hint.root, b"", True)
                if isinstance(hint, Rescan):
                    origin = hint.origin
                    self._metrics.rescans.labels(origin=origin).inc()
                for _ in rec.apply(hint, origin):
                    if rec.pending >= self._max_events or rec.event_bytes >= self._max_batch_bytes:
                        self._commit_batch(journal, rec)
                        taken, marks = {}, []
                        done = current
                        journal.begin()
                if isinstance(hint, Rescan) and hint.origin in ("baseline", "offline") and not hint.path:
                    self._initial_in_txn += 1
                    if self._initial_pending - self._initial_in_txn <= 0:
                        journal.mark_initialized()
            for _ in rec.close_vanished():  # a handful of `deleted` at most: no batch boundary needed
                pass
            self._commit_batch(journal, rec)
        except Exception as exc:
            journal.rollback()
            self._initial_in_txn = 0
            rec.drop_events()
            for reason, count in taken.items():  # their markers rolled back with the batch
                self._gaps.note_gap(reason, count)
            for mark in marks:
                self._gaps.note_mark(mark)
            return _Failure(exc, done, reached)
        finally:
            rec.end_flush()
        return None

    def _gap_events(self, rec: Reconciler) -> dict[str, int]:
        """The waiting gap causes, as events at the head of the batch; returned, to note again on a rollback."""
        reasons = self._gaps.take_gaps()
        for reason, count in reasons.items():
            rec.add_event(self._events.gap(reason, count or None))
        return reasons

    def _mark_events(self, journal: Journal, rec: Reconciler) -> list[Mark]:
        """The waiting lifecycle records, at the head of the batch, each with the journal's
        lifecycle flag it sets in the same transaction; returned, to note again on a rollback."""
        marks = self._gaps.take_marks()
        for mark in marks:
            rec.add_event(mark_event(self._events, mark))
            if mark.state is not None:
                journal.set_lifecycle(mark.state)
        return marks

    def commit_marks(self) -> None:
        """The owner's, once the journal thread has ended: commit the waiting records (the `stop`) alone,
        leaving the window as it is. When that fails, the next start says the run ended `unclean`."""
        failure = self._attempt([])
        if failure is not None:
            log.error("lifecycle_record_failed", error=repr(failure.exc))

    def _reopen_roots(self, rec: Reconciler, hints: list[Hint]) -> None:
        """A root the watcher found replaced or gone is read from its path again (`reopen_root`, before
        anything of it is read in this transaction), after a `gap` that says so; its `Rescan` follows."""
        for hint in hints:
            if not isinstance(hint, RootReplaced):
                continue
            if self._reopen_root(hint.root):
                rec.add_event(self._events.gap("root_replaced", None, hint.root))
            else:
                rec.add_event(self._events.gap("root_gone", None, hint.root))

    def _commit_batch(self, journal: Journal, rec: Reconciler) -> None:
        events = rec.take_events()
        rec.write_index()
        started = time.perf_counter()
        appended = journal.append(events) if events else None
        journal.commit()
        if appended is not None:
            self.on_committed(appended)
        elif events and self._local_store is not None:  # the store is the journal's own file: committed now
            self._local_store.committed(len(events), time.perf_counter() - started, events[0].ts)
        self._initial_pending = max(0, self._initial_pending - self._initial_in_txn)
        self._initial_in_txn = 0
        if self.health.initial_scan == "running":
            self._scan_changes += sum(1 for e in events if e.origin == self._initial_origin)
        if self._initial_pending == 0 and self.health.initial_scan == "running":
            self.health.initial_scan = "done"
            self._scan_walked = rec.entries_walked - self._scan_walked_from
            entries = journal.count()
            log.info("initial_scan_done", entries=entries, walked=self._scan_walked, changes=self._scan_changes)
            self._gaps.note_mark(scanned_mark(self._initial_origin, entries, self._scan_changes))
        for action, count in Counter(e.action for e in events).items():
            self._metrics.events_observed.labels(action=action).inc(count)
            if action == "gap":
                self.gaps += count
                self._metrics.gaps.inc(count)

    def _set_aside(self, hint: Hint, exc: Exception) -> None:
        """A bug met by this change alone: every other one goes on, and a `gap` marks the place."""
        log.error("change_failed", hint=repr(hint), exc_info=exc)
        self._metrics.events_dropped.labels(reason="pipeline_error").inc()
        self._gaps.note_gap("pipeline_error", 1)
        self.pipeline_errors += 1
        self.last_error = f"{hint!r}: {type(exc).__name__}: {exc}"
        self._last_error_at, self._last_error_wall = time.monotonic(), time.time()

    # Failures ------------------------------------------------------------------------------------

    def failed(self, exc: Exception) -> None:
        """A write to the journal failed (a flush, an ack, a rebuild): recover a damaged file; otherwise
        say so once, and try again after a back-off that doubles up to `JOURNAL_RETRY_MAX_S`."""
        if is_corruption(exc):
            self._on_corrupt(exc)
            return
        health = self.health
        code = getattr(exc, "sqlite_errorname", None) or (
            os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else type(exc).__name__
        )
        self._metrics.journal_errors.labels(error=str(code)).inc()
        if health.state != "error":
            log.error("journal_write_failed", error=str(exc), code=code, hint=_hint(exc))
            self.health = JournalHealth(
                state="error", error=f"{code}: {exc}", initial_scan=health.initial_scan, rebuilds=health.rebuilds
            )
        self.health.consecutive_failures += 1
        if self._local_store is not None:  # the journal's file is the store: it is the store failing
            self._local_store.failed(exc, str(code))
        self.retry_in(self._delay)
        self._delay = min(self._delay * 2, JOURNAL_RETRY_MAX_S)

    def _ok(self, changes: int) -> None:
        health = self.health
        if health.state == "error":
            log.info("journal_recovered", after_failures=health.consecutive_failures)
            self.health = JournalHealth(initial_scan=health.initial_scan, rebuilds=health.rebuilds)
            self._gaps.note_gap("journal_error", changes)  # these waited, coalescing, while writes failed
        self._delay = 0.5

    # Status --------------------------------------------------------------------------------------

    def scan_progress(self) -> dict[str, int | None]:
        """The start-up diff's progress (any thread): entries walked, and the index's size when it began,
        which is what a walk of an unchanged workspace comes to (None on a first start: nothing known)."""
        rec = self._reconciler
        walked = self._scan_walked
        if self.health.initial_scan == "running" and rec is not None:
            walked = max(0, rec.entries_walked - self._scan_walked_from)
        return {"entries_walked": walked, "entries_expected": self._scan_expected, "changes": self._scan_changes}

    def recent_error(self) -> str | None:
        """The last change set aside, while it is recent enough to keep the status degraded."""
        if self.last_error is None or time.monotonic() - self._last_error_at > PIPELINE_ERROR_DEGRADED_S:
            return None
        return self.last_error

    @property
    def last_error_wall(self) -> float | None:
        return self._last_error_wall if self.last_error is not None else None
