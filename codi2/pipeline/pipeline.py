"""watcher hints → window → flush (reconcile + journal, one transaction per batch) → the shipper.

One thread of its own, the **journal thread**, so the event loop never waits for a disk: it collects
hints into the batch window (which coalesces them per path and follows renames), and at the end of the
window has the `Flusher` (`codi2.pipeline.flusher`) reconcile them against the index and append the
events to the journal's outbox in the transaction that updates the index; what a failure keeps is told
there. When the index may be ahead of the trail, `IndexRebuild` (`codi2.pipeline.rebuild`) derives it
again before any flush. Each committed batch goes to `on_committed` (the shipper,
`codi2.ship.shipper`); with SQLite the journal's file is the store, and nothing is shipped.

This module owns the thread and what other threads hand it: the watcher's hints (`feed`), the causes of
`gap` events (`note_gap`), the shipper's acknowledgements and reports; it opens (or recovers) the journal
and composes the journal's part of /status. The hint buffers are bounded without ever blocking the
watcher: past the bound they collapse into a rescan of every root, which loses the fine history (a `gap`
says so) but never a change.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from codi2.config import STATE_DIR_NAME, BatchingSettings, MonitoringSettings, SpoolSettings
from codi2.disk.fs import ABSENT_ERRNOS, O_DIR
from codi2.disk.ignore import IgnoreRules
from codi2.journal import legacy
from codi2.journal.journal import Journal, JournalCorrupt, LocalStore, is_corruption
from codi2.journal.outbox import OutboxBatch
from codi2.journal.recovery import move_aside, salvage_outbox
from codi2.metrics import Metrics
from codi2.pipeline.factory import EventFactory, SessionFile
from codi2.pipeline.flusher import Flusher, JournalHealth
from codi2.pipeline.lifecycle import Mark, start_mark, stop_mark
from codi2.pipeline.rebuild import IndexRebuild
from codi2.pipeline.reconcile import Reconciler
from codi2.pipeline.window import Window
from codi2.ship.shipper import StoreMonitor
from codi2.stores.base import TrailReader
from codi2.trail.chain import ChainKey
from codi2.trail.events import Identity, Origin, rfc3339
from codi2.watch.hints import Hint, Rescan

log = structlog.get_logger("codi2.pipeline.pipeline")

MAX_HINTS = 250_000  # beyond this many pending hints, collapse into rescans of every root
# With nothing to do, the journal thread sleeps until woken (new hints, a stop): this bound only limits
# what a missed wake-up could cost, and keeps an idle daemon from waking.
IDLE_WAIT_S = 60.0
# The journal's pages checked (`Journal.check`) at start and then hourly, each check abandoned past its
# budget: the journal thread holds every flush meanwhile.
CHECK_AT_START_S = 10.0
CHECK_INTERVAL_S = 3600.0
CHECK_BUDGET_S = 2.0


@dataclass(frozen=True)
class JournalFile:
    """Where the journal lives and how its batches are sealed."""

    path: Path
    state_dir: Path  # the daemon's own: 0.1's state found there (or in the first root) is migrated on a first start
    local_store: LocalStore | None = None  # SQLite: the store lives in the journal's file, nothing is shipped
    chain_key: ChainKey | None = None  # seals every batch's link (HMAC) when set


def _has_journal(path: Path) -> bool:
    """Whether the file already holds a journal (the SQLite store of 0.1 does not: it gets one)."""
    if not path.exists():
        return False
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return True  # unreadable: let opening it say so
    try:
        return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None
    except sqlite3.Error:
        return True
    finally:
        db.close()


def _never_started(journal: Journal) -> bool:
    """A journal left by a first start that stopped before its first rebuild: flagged for one, never
    initialized, with nothing in its index or outbox."""
    return journal.needs_rebuild and not journal.initialized and journal.count() == 0 and journal.outbox_batches == 0


class Pipeline:
    """The journal thread and its hand-offs: the watcher's hints (`feed`), gap causes (`note_gap`), the
    shipper's reports; the flush itself is `Flusher`'s, the index rebuild `IndexRebuild`'s."""

    def __init__(
        self,
        *,
        roots: list[Path],
        journal_file: JournalFile,
        rules: IgnoreRules,
        identity: Identity,
        metrics: Metrics,
        store: StoreMonitor,
        batching: BatchingSettings,
        spool: SpoolSettings,
        monitoring: MonitoringSettings,
    ) -> None:
        self._roots = [os.fsencode(r) for r in roots]
        self.root_names = [str(r) for r in roots]
        self._file = journal_file
        self._rules = rules
        session_file = monitoring.session_file
        sessions = None if session_file is None else SessionFile(session_file, identity.session_id, roots)
        self._events = EventFactory(identity, self.root_names, self._take_seq, sessions)
        self.trail: TrailReader | None = None  # set once opened (with SQLite, after the journal: its file)
        # The shipper's: a journal recovered into a new file (each committed batch: `on_committed`).
        self.on_new_journal: Callable[[Journal], None] = lambda journal: None
        self._metrics = metrics
        self._max_events = batching.max_events
        self._max_delay = batching.max_delay_ms / 1000
        self.max_bytes = spool.max_bytes
        self._fsync = spool.fsync
        self._hash_max = monitoring.hash_max_bytes
        self._silent_baseline = monitoring.initial_scan == "silent"
        self.store = store
        self.journal: Journal | None = None
        self.gaps = 0  # gap events recorded outside a flush (a migration, a recovery)
        self.corrupt_records = 0
        self.lost_at_shutdown = 0
        self._root_fds: list[int] = []
        self._lock = threading.Condition()
        self._intake: list[Hint] = []
        self._window = Window()
        self._flusher = Flusher(
            self._window,
            self._events,
            self,
            metrics,
            batching,
            local_store=store if journal_file.local_store is not None else None,
            on_corrupt=self._journal_corrupt,
            reopen_root=self._reopen_root,
        )
        self._rebuild = IndexRebuild(identity, self.root_names, self._flusher)
        self._deadline: float | None = None
        self._gap_reasons: dict[str, int] = {}
        self._marks: list[Mark] = []  # lifecycle records for the head of the next batch
        self._recorded_start = False  # this run has a `start` record (on its way): its end gets a `stop`
        self._stopping = False
        self._stop_deadline = 0.0
        self._rebuild_requested = False
        self._fresh_remote = False  # a new journal beside a remote store: its first rebuild may find nothing
        self._journal_thread: threading.Thread | None = None
        self._ack_retry_at = 0.0  # deleting acknowledged rows failed (a full disk): tried again from then
        self._ack_failing = False
        self._tasks: list[Callable[[], None]] = []  # `post`ed: run on the journal thread between flushes
        self._recheck_every = monitoring.rescan_interval_s  # hard links with names out of sight (`recheck`)
        self._recheck_at = 0.0
        self._check_at = time.monotonic() + CHECK_INTERVAL_S

    @property
    def on_committed(self) -> Callable[[OutboxBatch], None]:
        """The shipper's: each batch once committed."""
        return self._flusher.on_committed

    @on_committed.setter
    def on_committed(self, hand: Callable[[OutboxBatch], None]) -> None:
        self._flusher.on_committed = hand

    @property
    def journal_health(self) -> JournalHealth:
        return self._flusher.health

    # Life cycle ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Blocking: open (or migrate, or recover) the journal and the roots."""
        place = self._file
        path = place.path
        fresh = not _has_journal(path)
        try:
            self.journal = Journal(path, fsync=self._fsync, store=place.local_store, key=place.chain_key)
            self.journal.check(CHECK_AT_START_S)
        except JournalCorrupt as exc:
            log.error("journal_corrupt", error=str(exc), action="moved aside; the index is rebuilt from the store")
            if self.journal is not None:
                self.journal.close()
            self.journal = self._recover(path)
        self.journal.on_ack = self._ack_posted
        # 0.1 kept its state in the workspace (`<root>/.codi2`); a sidecar's state dir is elsewhere, and
        # the workspace is read-only to it: migrate from there, leaving the old files to their owner.
        old_default = Path(os.fsdecode(self._roots[0])) / STATE_DIR_NAME
        migrated_any = False
        for old in dict.fromkeys([place.state_dir, old_default]):
            if fresh and legacy.present(old):
                migrated_any = True
                migrated = legacy.migrate(old, self.journal, remove=old == place.state_dir)
                self.corrupt_records += migrated.corrupt_records
                self._metrics.spool_corrupt_records.inc(migrated.corrupt_records)
                if migrated.corrupt_records and migrated.needs_rebuild:
                    with self.journal.transaction():
                        self.journal.append([self._events.gap("spool_corrupt", migrated.corrupt_records)])
                    self._metrics.gaps.inc()
                    self.gaps += 1
                break
        if fresh and not migrated_any and place.local_store is None:
            # No journal, but the store may hold a trail of this user's roots already (the state volume
            # was lost or wiped while the store kept everything): derive the index from it before the
            # first diff, or every entry would be `created` twice and what was deleted meanwhile never go.
            with self.journal.transaction():
                self.journal.set_needs_rebuild(True)
        # A journal this start made, or one a first start made before failing (the store could not be
        # opened, the watcher could not start): still a first start, whose scan is the baseline when the
        # store holds no trail of these roots either. (A recovered journal holds a `gap` in its outbox.)
        self._fresh_remote = place.local_store is None and _never_started(self.journal)
        self._root_fds = [os.open(r, O_DIR) for r in self._roots]
        self._flusher.attach(self.journal, self._new_reconciler(self.journal))

    def _new_reconciler(self, journal: Journal) -> Reconciler:
        return Reconciler(
            journal,
            self._root_fds,
            self.root_names,
            self._rules,
            self._hash_max,
            self._events,
            silent_baseline=self._silent_baseline,
        )

    def _recover(self, path: Path) -> Journal:
        """A journal that cannot be read: keep it for a post-mortem, carry over what still checks out, and
        rebuild the index from the store (the trail is the truth; the index is derived from it)."""
        aside = move_aside(path)
        batches, lost = salvage_outbox(aside)
        place = self._file
        self.journal = journal = Journal(path, fsync=self._fsync, store=place.local_store, key=place.chain_key)
        with journal.transaction():
            for batch_id, events, header in batches:
                journal.append(events, batch_id, header)
            kept = journal.salvage_store(aside)  # SQLite: the trail shares the file; carry it over
            # The gap is made durable here, with the recovery: a kill before the next batch loses neither.
            journal.append([self._events.gap("journal_corrupt", lost if lost > 0 else None)])
            journal.set_needs_rebuild(True)
        self._metrics.spool_corrupt_records.inc(max(lost, 0))
        self._metrics.gaps.inc()
        self.gaps += 1
        self.corrupt_records += max(lost, 0)
        log.error(
            "journal_recovered",
            kept_aside=str(aside),
            batches_salvaged=len(batches),
            batches_lost=lost,
            store_events_kept=kept,
        )
        return journal

    def start(self) -> None:
        self._journal_thread = threading.Thread(target=self._journal_loop, name="codi2-journal", daemon=True)
        self._journal_thread.start()

    @property
    def running(self) -> bool:
        return self._journal_thread is not None and self._journal_thread.is_alive()

    def feed(self, hints: list[Hint]) -> None:
        """Thread-safe, never blocks: the watcher's hand-off."""
        with self._lock:
            was_empty = not self._intake
            self._intake.extend(hints)
            if len(self._intake) > MAX_HINTS:
                self._collapse_locked(len(self._intake))
            # The journal thread takes everything at once: wake it for the first hints (they start the
            # window) and when enough wait to fill a batch, not for every hand-off in between.
            if was_empty or len(self._intake) >= self._max_events:
                self._lock.notify()

    def _collapse_locked(self, count: int) -> None:
        self._intake = self._every_root("rescan")
        self._gap_reasons["coalesced"] = self._gap_reasons.get("coalesced", 0) + count
        log.warning("hints_coalesced", count=count, note="too many pending changes; every root is rescanned")

    def _every_root(self, origin: Origin) -> list[Hint]:
        """A rescan of the whole of each root: what start-up, a rebuild and a collapsed intake all ask for."""
        return [Rescan(i, b"", True, origin) for i in range(len(self._roots))]

    def _scan_every_root(self, origin: Origin) -> None:
        """Every root diffed against the index, counted as the initial scan (start-up, or after a rebuild)."""
        self._flusher.expect_initial(len(self._roots), origin)
        self.feed(self._every_root(origin))

    def note_gap(self, reason: str, count: int | None) -> None:
        """Thread-safe: the next batch starts with a `gap` event (history before it is incomplete)."""
        with self._lock:
            self._gap_reasons[reason] = self._gap_reasons.get(reason, 0) + (count or 0)
            self._lock.notify()

    def post(self, task: Callable[[], None]) -> None:
        """Thread-safe: run `task` on the journal thread, between flushes (the daemon's retention with SQLite,
        whose file has that thread as its one writer). The task handles its own errors."""
        with self._lock:
            self._tasks.append(task)
            self._lock.notify()

    def initial_scan(self) -> None:
        """The start-up walk, after the watches are in place: a baseline on a first start, otherwise the
        diff against the index of what changed while the daemon was down."""
        assert self.journal is not None
        # After a rebuild from the store there was a trail before: what differs changed while we were down.
        known = self.journal.initialized or self.journal.needs_rebuild
        origin: Origin = "offline" if known else "baseline"
        self._scan_every_root(origin)

    def record_start(self, *, version: str, backend: str, config_sha256: str) -> None:
        """Before `start`: the run's `start` record heads its first batch, saying how the run before ended
        (the journal's lifecycle flag, read before anything of this run is committed)."""
        assert self.journal is not None and self._journal_thread is None
        previous = self.journal.lifecycle
        mark = start_mark(
            version=version,
            backend=backend,
            roots=self.root_names,
            config_sha256=config_sha256,
            previous=previous,
            history=self.journal.chain.batches > 0,
        )
        log.info("lifecycle_start", previous_run=mark.detail["previous_run"])
        self._recorded_start = True
        self.note_mark(mark)

    def note_mark(self, mark: Mark) -> None:
        """Thread-safe: a lifecycle record for the head of the next batch (`Gaps`); none in a run that
        records no `start` (a pipeline driven alone, without a daemon)."""
        if not self._recorded_start:
            return
        with self._lock:
            self._marks.append(mark)
            self._lock.notify()

    def take_marks(self) -> list[Mark]:
        with self._lock:
            marks, self._marks = self._marks, []
        return marks

    def stop(self, deadline: float) -> int:
        """Blocking (call it off the event loop): journal what was observed before `deadline` (monotonic).
        Returns how many pending changes could not even be journaled (the next start's diff finds them)."""
        self._stop_deadline = deadline
        with self._lock:
            self._stopping = True
            self._lock.notify()
        thread = self._journal_thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()) + 1)
            if thread.is_alive():  # still inside one flush: neither it nor what waits behind it is journaled
                self.lost_at_shutdown = max(self.lost_at_shutdown, self.pending_hints(), 1)
                log.error(
                    "changes_not_journaled",
                    count=self.lost_at_shutdown,
                    note="the journal thread is still working past the deadline; the next start's diff finds them",
                )
        return self.lost_at_shutdown

    def close(self) -> None:
        """Close the journal and the roots, unless the journal thread still works in them (past the
        shutdown deadline): then they stay open until the process ends, under it."""
        if self._journal_thread is not None and self._journal_thread.is_alive():
            return
        if self.journal is not None:
            self.settle_acks()
            if self._recorded_start and self._journal_thread is not None:  # it ran and ended: `stop` is the last batch
                if self._gap_pending():  # gaps noted at the very end come before it
                    self._flusher.commit_marks()
                self.note_mark(stop_mark(not_journaled=self.lost_at_shutdown, spool_events=self.journal.outbox_events))
                self._flusher.commit_marks()
            self.journal.close()
        for fd in self._root_fds:
            os.close(fd)
        self._root_fds = []

    # Journal thread ------------------------------------------------------------------------------

    def _ack_posted(self) -> None:
        """The shipper's thread: the store took a batch; wake the journal thread, idle or not, to delete it."""
        with self._lock:
            self._lock.notify()

    def _apply_acks(self) -> None:
        """Journal thread (or the owner after it): delete what the store acknowledged, between flushes. A
        failure (a full disk) keeps the rows and their figures, and is tried again a second later."""
        journal = self.journal
        if journal is None or not journal.acks_pending or time.monotonic() < self._ack_retry_at:
            return
        try:
            journal.apply_acks()
        except sqlite3.Error as exc:
            if is_corruption(exc):
                self._flusher.failed(exc)
                return
            if not self._ack_failing:
                log.warning("outbox_ack_failed", error=str(exc), note="the shipped rows stay until it works again")
            self._ack_failing = True
            self._ack_retry_at = time.monotonic() + 1.0
        else:
            self._ack_failing = False

    def settle_acks(self) -> None:
        """Once the journal thread has stopped, whoever stops the daemon owns the journal: the last
        acknowledgements (the shipper drains after the journal thread) are applied here."""
        if not self.running:
            self._apply_acks()

    def _journal_loop(self) -> None:
        try:
            while self._journal_step():
                pass
        except Exception:
            log.exception("journal_thread_failed")

    def _journal_step(self) -> bool:
        """One turn: take hints, flush when due. False once stopped and everything is committed."""
        with self._lock:
            timeout = self._wait_time()
            if self.journal is not None and self.journal.acks_pending:  # checked under the lock: no lost wake-up
                timeout = min(timeout, max(0.0, self._ack_retry_at - time.monotonic()))
            if not self._intake and not self._tasks and timeout > 0:
                self._lock.wait(timeout)
            hints, self._intake = self._intake, []
            tasks, self._tasks = self._tasks, []
            stopping = self._stopping
        self._apply_acks()  # first: they make room in the outbox (`_outbox_full`)
        for task in tasks:
            task()
        for hint in hints:
            self._window.add(hint)
        if self._window and self._deadline is None:
            self._deadline = time.monotonic() + self._max_delay
        if len(self._window) > MAX_HINTS:
            count = len(self._window)
            self._window.take()
            with self._lock:
                self._collapse_locked(count)
            return True
        now = time.monotonic()
        if stopping and now > self._stop_deadline:
            self.lost_at_shutdown = len(self._window)
            if self.lost_at_shutdown:
                self._metrics.events_dropped.labels(reason="shutdown_timeout").inc(self.lost_at_shutdown)
                log.error("changes_not_journaled", count=self.lost_at_shutdown, note="the next start's diff finds them")
            return False
        if now < self._flusher.retry_at:
            return True
        try:
            rebuild = self._rebuild_requested or (self.journal is not None and self.journal.needs_rebuild)
        except sqlite3.Error as exc:  # the journal's meta unreadable (a damaged first page): recover, retry
            self._flusher.failed(exc)
            return True
        if rebuild:
            self._rebuild_index()
            return True
        if not stopping:
            self._chores(now)
        if self._outbox_full():
            self._flusher.retry_in(0.5)  # the shipper has to make room first
            return True
        due = self._deadline is not None and now >= self._deadline
        if (self._window and (due or stopping or len(self._window) >= self._max_events)) or self._gap_pending():
            self._flush()
        # Stopping: done once nothing waits, a `gap` marker (noted by the last flush) included.
        return not (stopping and not self._window and not self._intake and not self._gap_pending())

    def _chores(self, now: float) -> None:
        """Between flushes, on the thread that owns the journal: a round over hard-linked files with names
        out of sight (`Reconciler.recheck`), and hourly a bounded check of the journal's pages."""
        journal, rec = self.journal, self._flusher.reconciler
        assert journal is not None and rec is not None
        try:
            if rec.recheck_pending and now >= self._recheck_at:
                self._recheck_at = now + self._recheck_every
                for hint in rec.recheck():
                    self._window.add(hint)
                if self._window and self._deadline is None:
                    self._deadline = now + self._max_delay
            if now >= self._check_at:
                self._check_at = now + CHECK_INTERVAL_S
                if not journal.check(CHECK_BUDGET_S):
                    log.warning("journal_check_incomplete", budget_s=CHECK_BUDGET_S)
        except (sqlite3.Error, JournalCorrupt) as exc:
            self._flusher.failed(exc)

    def _wait_time(self) -> float:
        """How long the journal thread may sleep: until the window is due, or a back-off has passed."""
        now = time.monotonic()
        retry_at = self._flusher.retry_at
        if retry_at > now:
            return min(retry_at - now, 1.0)
        if self._stopping:
            return 0.0 if self._window else 0.05
        if self._deadline is not None:
            return max(0.0, min(self._deadline - now, 1.0))
        # Work this thread gave itself, with no one left to wake it: changes put back after a failed flush
        # (their window is re-armed next turn), a gap or a rebuild asked for from inside a flush.
        if self._window or self._gap_reasons or self._marks or self._rebuild_requested:
            return 0.0
        rec = self._flusher.reconciler
        if rec is not None and rec.recheck_pending:
            return max(0.0, min(self._recheck_at - now, IDLE_WAIT_S))
        return IDLE_WAIT_S

    def _gap_pending(self) -> bool:
        return bool(self._gap_reasons or self._marks)

    def take_gaps(self) -> dict[str, int]:
        """Thread-safe: the flusher's, for the head of its batch (`Gaps`)."""
        with self._lock:
            reasons, self._gap_reasons = self._gap_reasons, {}
        return reasons

    def _outbox_full(self) -> bool:
        assert self.journal is not None
        full: bool = self.journal.outbox_bytes >= self.max_bytes
        flusher = self._flusher
        health = flusher.health
        if full and health.state != "full":
            log.warning("spool_full", bytes=self.journal.outbox_bytes, max_bytes=self.max_bytes)
            flusher.health = JournalHealth(state="full", initial_scan=health.initial_scan, rebuilds=health.rebuilds)
        elif not full and health.state == "full":
            flusher.health = JournalHealth(initial_scan=health.initial_scan, rebuilds=health.rebuilds)
            self.note_gap("spool_full", self.pending_hints())  # these waited, coalescing, while it was full
        return full

    def _flush(self) -> None:
        self._deadline = None  # the window is taken whole: the next hint starts a new one
        self._flusher.flush()

    def _reopen_root(self, root: int) -> bool:
        """Journal thread, in a flush: the watcher found another directory at root `root`'s path, or none.
        Read the root from its path from now on; whether a directory is there. A root that is gone is read
        through a directory that stays empty (made in the state dir and removed at once), so everything the
        index holds under it is `deleted`."""
        try:
            fd = os.open(self._roots[root], O_DIR)
            there = True
        except OSError as exc:
            if exc.errno not in ABSENT_ERRNOS:
                raise
            empty = tempfile.mkdtemp(prefix="gone-", dir=self._file.state_dir)
            fd = os.open(empty, O_DIR)
            os.rmdir(empty)
            there = False
        os.close(self._root_fds[root])
        self._root_fds[root] = fd  # in place: the reconciler and its cache read this list
        return there

    def _journal_corrupt(self, exc: Exception) -> None:
        """The journal's file is damaged (found by a flush, an ack, a rebuild): recover it into a new file."""
        log.error("journal_corrupt", error=str(exc), action="moved aside; the index is rebuilt from the store")
        assert self.journal is not None
        self.journal.close()
        self.journal = self._recover(self.journal.path)
        self._flusher.attach(self.journal, self._new_reconciler(self.journal))
        self._rebuild_requested = True  # at once: the recovery flagged it in the new file, without a wake-up
        self.journal.on_ack = self._ack_posted
        self.on_new_journal(self.journal)  # the shipper reads the new file from its start

    # Index rebuild -------------------------------------------------------------------------------

    def request_rebuild(self) -> None:
        """Thread-safe: the index may be ahead of the trail (a batch was lost); derive it again."""
        with self._lock:
            self._rebuild_requested = True
            self._lock.notify()

    def _rebuild_index(self) -> None:
        """Derive the index from the trail, then diff every root against it (`codi2.pipeline.rebuild`)."""
        assert self.journal is not None
        origin = self._rebuild.run(self.journal, self.trail, first_start=self._fresh_remote)
        if origin is None:
            return
        self._rebuild_requested = False
        self._fresh_remote = False
        self._scan_every_root(origin)

    # Events --------------------------------------------------------------------------------------

    def _take_seq(self) -> int:
        """The sequence number of the next event: the journal's, whichever journal is open now."""
        assert self.journal is not None
        return self.journal.take_seq()

    # What the shipper reports ---------------------------------------------------------------------

    def outbox_batch_lost(self, n: int, reason: str) -> None:
        """A batch that no longer checks out: its events are lost; say so, and derive the index again
        (it holds their effects)."""
        log.error("outbox_batch_corrupt", batch=n, reason=reason)
        self.corrupt_records += 1
        self._metrics.spool_corrupt_records.inc()
        self.note_gap("outbox_corrupt", None)
        self.request_rebuild()

    # Status --------------------------------------------------------------------------------------

    def scan_progress(self) -> dict[str, int | None]:
        """The start-up diff's progress (any thread): entries walked, expected, changes found."""
        return self._flusher.scan_progress()

    def pending_hints(self) -> int:
        return len(self._intake) + len(self._window)

    def degraded(self) -> list[str]:
        jh = self.journal_health
        reasons = []
        if jh.state == "error":
            reasons.append(f"journal write failing, changes kept and retried: {jh.error}")
        if jh.state == "full":
            reasons.append("spool full: journaling paused until the store catches up (changes coalesce)")
        if jh.initial_scan == "waiting":
            reasons.append("index rebuild waiting for the store to be readable")
        if (error := self._flusher.recent_error()) is not None:
            reasons.append(f"a change met a bug and was set aside (gap pipeline_error): {error}")
        return reasons

    def snapshot(self) -> dict[str, Any]:
        """The journal's part of /status."""
        jh, journal, flusher = self.journal_health, self.journal, self._flusher
        error_at = flusher.last_error_wall
        key = self._file.chain_key
        return {
            "initial_scan": jh.initial_scan,
            "initial_scan_progress": self.scan_progress(),
            "pipeline": {
                "pending_changes": self.pending_hints(),
                "pipeline_errors": flusher.pipeline_errors,
                "last_error": flusher.last_error,
                "last_error_at": rfc3339(error_at) if error_at is not None else None,
                "hashing": self._flusher.hashing(),
            },
            "journal": {
                "state": jh.state,
                "error": jh.error,
                "consecutive_failures": jh.consecutive_failures,
                "since": rfc3339(jh.since),
                "index_rebuilds": jh.rebuilds,
                "stream_id": journal.stream_id if journal else None,
            },
            "chain": {
                "stream_id": journal.stream_id if journal else None,
                "batches": journal.chain.batches if journal else 0,
                "head": journal.chain.link.hex() if journal else None,
                "key_id": key.id if key else None,
            },
            "spool": {
                "batches": journal.outbox_batches if journal else 0,
                "events": journal.outbox_events if journal else 0,
                "bytes": journal.outbox_bytes if journal else 0,
                "max_bytes": self.max_bytes,
                "corrupt_records": self.corrupt_records,
                "gaps_recorded": self.gaps + flusher.gaps,
            },
        }
