"""watcher hints → window → reconcile + journal (one transaction per batch) → the shipper.

One thread of its own, the **journal thread**, so the event loop never waits for a disk: it collects
hints into the batch window (which coalesces them per path and follows renames), and at the end of the
window reconciles them against the index, appending the events to the journal's outbox in the same
transaction that updates the index. A failed transaction (a full disk) rolls both back and keeps the
hints, which are tried again with back-off: nothing observed is dropped, and the history that was
coarsened meanwhile is marked by a `gap` event. Each committed batch goes to `on_committed` (the
shipper, `codi2/shipper.py`); with SQLite the journal's file is the store, and nothing is shipped.

The hint buffers are bounded without ever blocking the watcher: past the bound they collapse into a
rescan of every root, which loses the fine history (a `gap` says so) but never a change.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from codi2.config import STATE_DIR_NAME
from codi2.disk.fs import O_DIR, RESOURCE_ERRNOS, Facts
from codi2.disk.ignore import IgnoreRules
from codi2.journal import legacy
from codi2.journal.index import key_of
from codi2.journal.journal import Journal, JournalCorrupt, LocalStore, is_corruption
from codi2.journal.outbox import OutboxBatch, OutboxReader
from codi2.journal.recovery import move_aside, salvage_outbox
from codi2.metrics import Metrics
from codi2.pipeline.factory import EventFactory, SessionFile
from codi2.pipeline.reconcile import Reconciler
from codi2.pipeline.window import Window
from codi2.ship.shipper import StoreMonitor
from codi2.stores.base import TrailReader
from codi2.trail.chain import ChainKey
from codi2.trail.events import Event, Identity, Origin, rfc3339
from codi2.trail.replay import fold_events
from codi2.watch.hints import Hint, Rescan

log = structlog.get_logger("codi2.pipeline.pipeline")

JOURNAL_RETRY_MAX_S = 30.0
MAX_HINTS = 250_000  # beyond this many pending hints, collapse into rescans of every root
# With nothing to do, the journal thread sleeps until woken (new hints, a stop): this bound only limits
# what a missed wake-up could cost, and keeps an idle daemon from waking.
IDLE_WAIT_S = 60.0


@dataclass
class JournalHealth:
    """Written by the journal thread, read by /status."""

    state: str = "ok"  # ok | error (a write failed; retrying) | full (the outbox reached its limit)
    error: str | None = None
    since: float = field(default_factory=time.time)
    consecutive_failures: int = 0
    initial_scan: str = "pending"  # pending | running | done | waiting (for an index rebuild)
    rebuilds: int = 0


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


def _environmental(exc: BaseException) -> bool:
    """A failure of the disk or the database (worth retrying), as opposed to a bug in handling one change."""
    return isinstance(exc, OSError | sqlite3.Error)


def _hint(exc: BaseException) -> str:
    """What an operator can do about a failing flush."""
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return "raise the open-file limit of the container (nofile) or free memory; the changes wait and are retried"
    return "free disk space under the state dir"


class Pipeline:
    def __init__(
        self,
        *,
        roots: list[Path],
        state_dir: Path,
        journal_path: Path,
        local_store: LocalStore | None,
        rules: IgnoreRules,
        identity: Identity,
        metrics: Metrics,
        max_events: int,
        max_batch_bytes: int,
        max_delay_ms: int,
        max_bytes: int,
        hash_max_bytes: int,
        fsync: bool,
        initial_scan: str,
        store: StoreMonitor,
        chain_key: ChainKey | None = None,
        session_file: Path | None = None,
    ) -> None:
        self._roots = [os.fsencode(r) for r in roots]
        self.root_names = [str(r) for r in roots]
        self._state_dir = state_dir
        self._journal_path = journal_path
        self._local_store = local_store  # the store lives in the journal's file: nothing to ship
        self._rules = rules
        self._identity = identity
        sessions = None if session_file is None else SessionFile(session_file, identity.session_id)
        self._events = EventFactory(identity, self.root_names, self._take_seq, sessions)
        self.trail: TrailReader | None = None  # set once opened (with SQLite, after the journal: its file)
        # The shipper's: each batch once committed, and a journal recovered into a new file.
        self.on_committed: Callable[[OutboxBatch], None] = lambda batch: None
        self.on_new_journal: Callable[[Journal], None] = lambda journal: None
        self._metrics = metrics
        self._max_events = max_events
        self._max_batch_bytes = max_batch_bytes
        self._max_delay = max_delay_ms / 1000
        self.max_bytes = max_bytes
        self._hash_max = hash_max_bytes
        self._fsync = fsync
        self._chain_key = chain_key  # seals every batch's link (HMAC) when set
        self._silent_baseline = initial_scan == "silent"
        self.store = store
        self.journal_health = JournalHealth()
        self.journal: Journal | None = None
        self.gaps = 0
        self.corrupt_records = 0
        self.lost_at_shutdown = 0
        self._root_fds: list[int] = []
        self._reconciler: Reconciler | None = None
        self._lock = threading.Condition()
        self._intake: list[Hint] = []
        self._window = Window()
        self._deadline: float | None = None
        self._retry_at = 0.0
        self._journal_delay = 0.5
        self._gap_reasons: dict[str, int] = {}
        self._initial_pending = 0
        self._initial_in_txn = 0
        self._stopping = False
        self._stop_deadline = 0.0
        self._rebuild_requested = False
        self._fresh_remote = False  # a new journal beside a remote store: its first rebuild may find nothing
        self._journal_thread: threading.Thread | None = None
        self._ack_retry_at = 0.0  # deleting acknowledged rows failed (a full disk): tried again from then
        self._ack_failing = False

    # Life cycle ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Blocking: open (or migrate, or recover) the journal and the roots."""
        path = self._journal_path
        fresh = not _has_journal(path)
        try:
            self.journal = Journal(path, fsync=self._fsync, store=self._local_store, key=self._chain_key)
        except JournalCorrupt as exc:
            log.error("journal_corrupt", error=str(exc), action="moved aside; the index is rebuilt from the store")
            self.journal = self._recover(path)
        self.journal.on_ack = self._ack_posted
        # 0.1 kept its state in the workspace (`<root>/.codi2`); a sidecar's state dir is elsewhere, and
        # the workspace is read-only to it: migrate from there, leaving the old files to their owner.
        old_default = Path(os.fsdecode(self._roots[0])) / STATE_DIR_NAME
        migrated_any = False
        for place in dict.fromkeys([self._state_dir, old_default]):
            if fresh and legacy.present(place):
                migrated_any = True
                migrated = legacy.migrate(place, self.journal, remove=place == self._state_dir)
                self.corrupt_records += migrated.corrupt_records
                self._metrics.spool_corrupt_records.inc(migrated.corrupt_records)
                if migrated.corrupt_records and migrated.needs_rebuild:
                    with self.journal.transaction():
                        self.journal.append([self._events.gap("spool_corrupt", migrated.corrupt_records)])
                    self._metrics.gaps.inc()
                    self.gaps += 1
                break
        if fresh and not migrated_any and self._local_store is None:
            # No journal, but the store may hold a trail of this user's roots already (the state volume
            # was lost or wiped while the store kept everything): derive the index from it before the
            # first diff, or every entry would be `created` twice and what was deleted meanwhile never go.
            with self.journal.transaction():
                self.journal.set_needs_rebuild(True)
        # A journal this start made, or one a first start made before failing (the store could not be
        # opened, the watcher could not start): still a first start, whose scan is the baseline when the
        # store holds no trail of these roots either. (A recovered journal holds a `gap` in its outbox.)
        self._fresh_remote = self._local_store is None and _never_started(self.journal)
        self._root_fds = [os.open(r, O_DIR) for r in self._roots]
        self._reconciler = self._new_reconciler(self.journal)

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
        self.journal = journal = Journal(path, fsync=self._fsync, store=self._local_store, key=self._chain_key)
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
        self._intake = [Rescan(i, b"", True) for i in range(len(self._roots))]
        self._gap_reasons["coalesced"] = self._gap_reasons.get("coalesced", 0) + count
        log.warning("hints_coalesced", count=count, note="too many pending changes; every root is rescanned")

    def note_gap(self, reason: str, count: int | None) -> None:
        """Thread-safe: the next batch starts with a `gap` event (history before it is incomplete)."""
        with self._lock:
            self._gap_reasons[reason] = self._gap_reasons.get(reason, 0) + (count or 0)
            self._lock.notify()

    def initial_scan(self) -> None:
        """The start-up walk, after the watches are in place: a baseline on a first start, otherwise the
        diff against the index of what changed while the daemon was down."""
        assert self.journal is not None
        # After a rebuild from the store there was a trail before: what differs changed while we were down.
        known = self.journal.initialized or self.journal.needs_rebuild
        origin: Origin = "offline" if known else "baseline"
        self._initial_pending = len(self._roots)
        self.journal_health.initial_scan = "running"
        self.feed([Rescan(i, b"", True, origin) for i in range(len(self._roots))])

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
                self._journal_failed(exc)
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
            if not self._intake and timeout > 0:
                self._lock.wait(timeout)
            hints, self._intake = self._intake, []
            stopping = self._stopping
        self._apply_acks()  # first: they make room in the outbox (`_outbox_full`)
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
        if now < self._retry_at:
            return True
        try:
            rebuild = self._rebuild_requested or (self.journal is not None and self.journal.needs_rebuild)
        except sqlite3.Error as exc:  # the journal's meta unreadable (a damaged first page): recover, retry
            self._journal_failed(exc)
            return True
        if rebuild:
            self._rebuild()
            return True
        if self._outbox_full():
            self._retry_at = now + 0.5  # the shipper has to make room first
            return True
        due = self._deadline is not None and now >= self._deadline
        if (self._window and (due or stopping or len(self._window) >= self._max_events)) or self._gap_pending():
            self._flush()
        return not (stopping and not self._window and not self._intake)

    def _wait_time(self) -> float:
        """How long the journal thread may sleep: until the window is due, or a back-off has passed."""
        now = time.monotonic()
        if self._retry_at > now:
            return min(self._retry_at - now, 1.0)
        if self._stopping:
            return 0.0 if self._window else 0.05
        if self._deadline is not None:
            return max(0.0, min(self._deadline - now, 1.0))
        # Work this thread gave itself, with no one left to wake it: changes put back after a failed flush
        # (their window is re-armed next turn), a gap or a rebuild asked for from inside a flush.
        if self._window or self._gap_reasons or self._rebuild_requested:
            return 0.0
        return IDLE_WAIT_S

    def _gap_pending(self) -> bool:
        return bool(self._gap_reasons)

    def _outbox_full(self) -> bool:
        assert self.journal is not None
        full: bool = self.journal.outbox_bytes >= self.max_bytes
        health = self.journal_health
        if full and health.state != "full":
            log.warning("spool_full", bytes=self.journal.outbox_bytes, max_bytes=self.max_bytes)
            self.journal_health = JournalHealth(
                state="full", initial_scan=health.initial_scan, rebuilds=health.rebuilds
            )
        elif not full and health.state == "full":
            self.journal_health = JournalHealth(initial_scan=health.initial_scan, rebuilds=health.rebuilds)
            self.note_gap("spool_full", self.pending_hints())  # these waited, coalescing, while it was full
        return full

    def _flush(self) -> None:
        """Reconcile the window's hints and commit the events, a batch per transaction."""
        journal, rec = self.journal, self._reconciler
        assert journal is not None and rec is not None
        items = self._window.take()
        self._deadline = None
        self._events.refresh_session()
        committed_through = 0  # items before this index are wholly committed
        current = 0
        try:
            journal.begin()
            rec.prefetch(items)
            self._gap_events()
            for current, item in enumerate(items):
                origin: Origin = "live"
                if isinstance(item, Rescan):
                    origin = item.origin
                    self._metrics.rescans.labels(origin=origin).inc()
                for _ in rec.apply(item, origin):
                    if rec.pending >= self._max_events or rec.event_bytes >= self._max_batch_bytes:
                        self._commit_batch()
                        committed_through = current
                        journal.begin()
                if isinstance(item, Rescan) and item.origin in ("baseline", "offline") and not item.path:
                    self._initial_in_txn += 1
                    if self._initial_pending - self._initial_in_txn <= 0:
                        journal.mark_initialized()
            self._commit_batch()
            committed_through = len(items)
        except Exception as exc:
            journal.rollback()
            self._initial_in_txn = 0
            rec.drop_events()
            if not _environmental(exc):
                # A bug met by one change must not hold back every later one: set that change aside.
                log.exception("change_failed", hint=repr(items[current]))
                self._metrics.events_dropped.labels(reason="pipeline_error").inc()
                self.note_gap("pipeline_error", 1)
                self._window.restore(items[committed_through:current] + items[current + 1 :])
                return
            self._window.restore(items[committed_through:])
            self._journal_failed(exc)
            return
        finally:
            rec.end_flush()
        self._journal_ok(len(items))

    def _commit_batch(self) -> None:
        journal, rec = self.journal, self._reconciler
        assert journal is not None and rec is not None
        events = rec.take_events()
        rec.write_index()
        started = time.perf_counter()
        appended = journal.append(events) if events else None
        journal.commit()
        if appended is not None:
            self.on_committed(appended)
        elif events:  # the store is the journal's own file: committed just now
            self.store.committed(len(events), time.perf_counter() - started, events[0].ts)
        self._initial_pending = max(0, self._initial_pending - self._initial_in_txn)
        self._initial_in_txn = 0
        if self._initial_pending == 0 and self.journal_health.initial_scan == "running":
            self.journal_health.initial_scan = "done"
            log.info("initial_scan_done", entries=journal.count())
        for action, count in Counter(e.action for e in events).items():
            self._metrics.events_observed.labels(action=action).inc(count)
            if action == "gap":
                self.gaps += count
                self._metrics.gaps.inc(count)

    def _gap_events(self) -> None:
        rec = self._reconciler
        assert rec is not None
        with self._lock:
            reasons, self._gap_reasons = self._gap_reasons, {}
        for reason, count in reasons.items():
            rec.add_event(self._events.gap(reason, count or None))

    def _journal_failed(self, exc: Exception) -> None:
        if is_corruption(exc):
            log.error("journal_corrupt", error=str(exc), action="moved aside; the index is rebuilt from the store")
            assert self.journal is not None
            self.journal.close()
            self.journal = self._recover(self.journal.path)
            self._reconciler = self._new_reconciler(self.journal)
            self._rebuild_requested = True  # at once: the recovery flagged it in the new file, without a wake-up
            self.journal.on_ack = self._ack_posted
            self.on_new_journal(self.journal)  # the shipper reads the new file from its start
            return
        health = self.journal_health
        code = getattr(exc, "sqlite_errorname", None) or (
            os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else type(exc).__name__
        )
        self._metrics.journal_errors.labels(error=str(code)).inc()
        if health.state != "error":
            log.error("journal_write_failed", error=str(exc), code=code, hint=_hint(exc))
            self.journal_health = JournalHealth(
                state="error", error=f"{code}: {exc}", initial_scan=health.initial_scan, rebuilds=health.rebuilds
            )
        self.journal_health.consecutive_failures += 1
        if self._local_store is not None:  # the journal's file is the store: it is the store failing
            self.store.failed(exc, str(code))
        self._retry_at = time.monotonic() + self._journal_delay
        self._journal_delay = min(self._journal_delay * 2, JOURNAL_RETRY_MAX_S)

    def _journal_ok(self, changes: int) -> None:
        health = self.journal_health
        if health.state == "error":
            log.info("journal_recovered", after_failures=health.consecutive_failures)
            self.journal_health = JournalHealth(initial_scan=health.initial_scan, rebuilds=health.rebuilds)
            self.note_gap("journal_error", changes)  # these waited, coalescing, while writes failed
        self._journal_delay = 0.5

    # Index rebuild -------------------------------------------------------------------------------

    def request_rebuild(self) -> None:
        """Thread-safe: the index may be ahead of the trail (a batch was lost); derive it again."""
        with self._lock:
            self._rebuild_requested = True
            self._lock.notify()

    def _rebuild(self) -> None:
        """Derive the index from the trail: the store's events of this user under these roots, then
        the outbox not yet shipped. Then every root is diffed against it, so whatever changed that the
        trail lacks is recorded (nothing absorbed silently), and nothing it has is recorded twice."""
        journal = self.journal
        assert journal is not None
        self.journal_health.initial_scan = "waiting"
        ident = self._identity
        roots = set(self.root_names)
        try:
            # The outbox first, then the store: a batch the shipper commits (and deletes from the outbox)
            # between the two reads is then in the store's read. Read the other way round it would be in
            # neither, and what it recorded would be recorded again by the diff that follows.
            reader = OutboxReader(journal.path)
            try:
                pending: list[Event] = []
                after = 0
                while batches := reader.next_batches(after, 64):
                    for b in batches:
                        if isinstance(b, OutboxBatch):
                            pending.extend(b.events)
                        after = b.n if isinstance(b, OutboxBatch) else b[0]
            finally:
                reader.close()
            stored: set[str] = set()

            def trail() -> Iterator[Event]:
                for e in self._trail().user_trail(ident.tenant_id, ident.user_id, roots):
                    stored.add(e.id)
                    yield e

            state = fold_events(trail())
            # Only what the store does not have yet, in order: a rename folded twice would drop its target.
            state = fold_events((e for e in pending if e.id not in stored), state)
        except Exception as exc:
            if is_corruption(exc):  # the outbox, not the store: the journal is recovered, then rebuilt
                self._journal_failed(exc)
                return
            log.warning("index_rebuild_waiting", error=str(exc), hint="the store must be readable to rebuild")
            self._retry_at = time.monotonic() + 5.0
            return
        rows = [
            (root, key_of(os.fsencode(path)), Facts(e.type, e.size, e.mode, None, None, None, None, None, e.sha256))
            for (root, path), e in state.items()
        ]
        try:
            with journal.transaction():
                journal.replace_index(rows)
                journal.set_needs_rebuild(False)
                journal.mark_initialized()
        except Exception as exc:
            self._journal_failed(exc)
            return
        self._rebuild_requested = False
        self.journal_health.rebuilds += 1
        log.info("index_rebuilt", entries=len(rows))
        # A new journal whose store holds no trail of these roots yet: this is the very first start.
        origin: Origin = "baseline" if self._fresh_remote and not rows else "offline"
        self._fresh_remote = False
        self._initial_pending = len(self._roots)
        self.journal_health.initial_scan = "running"
        self.feed([Rescan(i, b"", True, origin) for i in range(len(self._roots))])

    def _trail(self) -> TrailReader:
        assert self.trail is not None, "the daemon sets the store before it starts the pipeline"
        return self.trail

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
        return reasons

    def snapshot(self) -> dict[str, Any]:
        """The journal's part of /status."""
        jh, journal = self.journal_health, self.journal
        return {
            "initial_scan": jh.initial_scan,
            "pipeline": {"pending_changes": self.pending_hints()},
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
                "key_id": self._chain_key.id if self._chain_key else None,
            },
            "spool": {
                "batches": journal.outbox_batches if journal else 0,
                "events": journal.outbox_events if journal else 0,
                "bytes": journal.outbox_bytes if journal else 0,
                "max_bytes": self.max_bytes,
                "corrupt_records": self.corrupt_records,
                "gaps_recorded": self.gaps,
            },
        }
