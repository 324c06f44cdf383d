"""The daemon's life cycle in one class: start-up, `should_exit`, graceful shutdown, signals.

Start-up order: health port first (probes answer while watches are placed; `/readyz` says 503 until they
are), then the state-dir lock, the store, the journal, the watcher, and the start-up diff. Shutdown
order: read every change the kernel queued (a watcher barrier), journal it, ship what the store takes
in time, close. Everything that blocks runs in a thread: the event loop only serves the health port.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from codi2 import __version__
from codi2.chain import load_key
from codi2.config import ConfigError, Settings
from codi2.events import Identity, rfc3339
from codi2.health import HealthServer, build_app
from codi2.ignore import IgnoreRules
from codi2.journal import FILE_NAME, JournalUnavailable
from codi2.metrics import Metrics
from codi2.pipeline import Pipeline
from codi2.sinks import Sink, open_sink
from codi2.watcher import Watcher, check_root

log = structlog.get_logger("codi2.daemon")

SHUTDOWN_FLUSH_S = 20.0
WATCHER_DRAIN_S = 5.0


class StartupError(Exception):
    """The daemon cannot start; the message is one line for the operator."""


class StateLock:
    """One daemon per state directory: a second one on the same workspace would write the same journal.
    With SQLite the journal is the store's file, which `[storage] sqlite_path` may name from any state
    directory: that file gets a lock of its own (`<sqlite_path>.lock`), else two daemons would share one
    stream, numbering its batches over each other."""

    def __init__(self, state_dir: Path, *, file: Path | None = None) -> None:
        self.path = state_dir / "lock" if file is None else file.with_name(file.name + ".lock")
        self._what = (state_dir, "this state directory") if file is None else (file, "this SQLite store")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            where, what = self._what
            raise StartupError(f"{where}: another codi2 (pid {holder}) is running on {what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Daemon:
    def __init__(
        self, settings: Settings, identity: Identity, open_store: Callable[[Settings], Sink] = open_sink
    ) -> None:
        self.settings = settings
        self._open_store = open_store
        self.identity = identity
        self.metrics = Metrics()
        self.should_exit = asyncio.Event()
        self.started_at = time.time()
        self.health: HealthServer | None = None
        self.sink: Sink | None = None
        self.pipeline: Pipeline | None = None
        self.watcher: Watcher | None = None
        self._lock = StateLock(settings.state_dir)
        self._store_lock = (
            StateLock(settings.state_dir, file=settings.sqlite_file) if settings.backend == "sqlite" else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._armed = False
        key_file = settings.integrity.key_file
        try:
            self.chain_key = load_key(key_file) if key_file is not None else None
        except ValueError as exc:
            raise ConfigError(f"integrity.key_file: {exc}") from None

    # Life cycle ----------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT; 0 when every observed change reached the journal."""
        self._install_signal_handlers()
        try:
            await self.startup()
        except BaseException:
            await self.shutdown()
            raise
        log.info(
            "codi2_ready",
            version=__version__,
            backend=self.settings.backend,
            roots=[str(r) for r in self.settings.watch_roots],
            watches=self.watcher.state.watches if self.watcher else 0,
            health_port=self.health.port if self.health else None,
        )
        await self.should_exit.wait()
        return await self.shutdown()

    async def startup(self) -> None:
        s = self.settings
        self.health = HealthServer(self._app(), s.server.host, s.server.port)
        try:
            await self.health.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {s.server.bind_addr}: {exc.strerror or exc}") from None
        for root in s.watch_roots:
            try:
                check_root(os.fsencode(root))
            except OSError as exc:
                raise StartupError(f"cannot watch {exc.filename}: {exc.strerror}") from None
        try:
            await asyncio.to_thread(self._lock.acquire)
        except OSError as exc:
            raise StartupError(
                f"state dir {s.state_dir}: {exc.strerror or exc} (set [state] dir or CODI2_STATE__DIR to a writable"
                " directory)"
            ) from None
        if self._store_lock is not None:
            try:
                await asyncio.to_thread(self._store_lock.acquire)
            except OSError as exc:
                raise StartupError(f"cannot lock {self._store_lock.path}: {exc.strerror or exc}") from None
        rules = IgnoreRules(s.monitoring.ignore_patterns, s.watch_roots, self._private_paths())
        local = None
        if s.backend == "sqlite":  # the store's file holds the journal too: one file, one commit
            from codi2.sinks.sqlite import LocalStore

            local = LocalStore()
        self.pipeline = Pipeline(
            roots=s.watch_roots,
            state_dir=s.state_dir,
            journal_path=s.sqlite_file if local else s.state_dir / FILE_NAME,
            local_store=local,
            rules=rules,
            identity=self.identity,
            metrics=self.metrics,
            max_events=s.batching.max_events,
            max_batch_bytes=s.batching.max_bytes,
            max_delay_ms=s.batching.max_delay_ms,
            max_bytes=s.spool.max_bytes,
            hash_max_bytes=s.monitoring.hash_max_bytes,
            fsync=s.spool.fsync,
            initial_scan=s.monitoring.initial_scan,
            chain_key=self.chain_key,
        )
        try:
            # The journal first: with SQLite it is the store's file, and a damaged one is recovered there.
            await asyncio.to_thread(self.pipeline.open)
        except JournalUnavailable as exc:
            raise StartupError(f"cannot open the journal {exc}") from None
        except OSError as exc:
            raise StartupError(f"cannot open the journal in {s.state_dir}: {exc.strerror or exc}") from None
        try:
            self.sink = await asyncio.to_thread(self._open_store, s)
        except Exception as exc:
            raise StartupError(f"cannot open the {s.backend} store: {exc}") from None
        self.pipeline.sink = self.sink
        rules.add_private_files(self._private_files())
        self.pipeline.start()
        self.watcher = Watcher(
            s.watch_roots, rules, s.state_dir / "barrier", on_hints=self.pipeline.feed, on_overflow=self._overflow
        )
        self._gauges()
        try:
            await asyncio.to_thread(self.watcher.start)
        except OSError as exc:
            raise StartupError(f"cannot watch {exc.filename}: {exc.strerror}") from None
        # Watches first, then the walk: a change made meanwhile is seen live, by the walk, or both (the
        # second look finds nothing new), never by neither. Ready now: whatever changes from here on
        # reaches the trail, and the start-up diff goes on in the background (see /status).
        self.pipeline.initial_scan()
        self._tasks.append(asyncio.create_task(self._retry_unwatched(), name="codi2-unwatched"))
        self._armed = True

    def _overflow(self) -> None:
        """Watcher thread, after IN_Q_OVERFLOW: the watcher recrawls; the trail notes the lost history."""
        self.metrics.inotify_overflows.inc()
        if self.pipeline is not None:
            self.pipeline.note_gap("inotify_overflow", None)

    async def _retry_unwatched(self) -> None:
        """Directories without a watch (watch limit, permissions) are retried, and diffed, periodically."""
        while True:
            await asyncio.sleep(self.settings.monitoring.rescan_interval_s)
            watcher = self.watcher
            if watcher is not None and watcher.state.unwatched:
                watcher.request(watcher.retry_unwatched)

    def _gauges(self) -> None:
        m, pipeline = self.metrics, self.pipeline
        assert pipeline is not None and pipeline.journal is not None
        m.inotify_watches.set_function(lambda: self.watcher.state.watches if self.watcher else 0)
        m.unwatched_dirs.set_function(lambda: len(self.watcher.state.unwatched) if self.watcher else 0)
        m.spool_events.set_function(lambda: pipeline.journal.outbox_events if pipeline.journal else 0)
        m.spool_bytes.set_function(lambda: pipeline.journal.outbox_bytes if pipeline.journal else 0)
        m.spool_max_bytes.set(pipeline.max_bytes)
        m.pipeline_queue.set_function(pipeline.pending_hints)
        m.ready.set_function(lambda: float(all(check() for check in self._ready_checks.values())))
        m.handler_errors.source = lambda: float(self.watcher.state.handler_errors if self.watcher else 0)

    async def shutdown(self) -> int:
        lost = 0
        self._armed = False
        for task in self._tasks:
            task.cancel()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop, WATCHER_DRAIN_S)
        if self.pipeline is not None:
            lost = await asyncio.to_thread(self.pipeline.stop, SHUTDOWN_FLUSH_S)
            journal = self.pipeline.journal
            if journal is not None and journal.outbox_events:
                log.warning(
                    "events_left_in_spool",
                    count=journal.outbox_events,
                    store=self.pipeline.store.error,
                    note="committed at the next start",
                )
        if self.sink is not None:
            await asyncio.to_thread(self.sink.close)
        self._lock.release()
        if self._store_lock is not None:
            self._store_lock.release()
        if self.health is not None:
            await self.health.stop()
        log.info("codi2_stopped", uncommitted=lost)
        return 0 if lost == 0 else 1

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("shutdown_requested", signal=sig.name)
        self.should_exit.set()

    def _private_paths(self) -> list[Path]:
        """The daemon's own files never become audit events (that would feed back forever)."""
        s = self.settings
        paths = [s.state_dir]
        if s.backend == "sqlite":
            db = s.sqlite_file
            paths += _with_companions(db)
        return paths

    def _private_files(self) -> list[Path]:
        """The files the daemon holds open with locks (journal, store, their WAL and shm, the lock files)."""
        s = self.settings
        files = [s.state_dir / "lock"]
        for db in [s.state_dir / FILE_NAME] + ([s.sqlite_file] if s.backend == "sqlite" else []):
            files += _with_companions(db)
        return files

    # What the health server reads ----------------------------------------------------------------

    def _app(self) -> Any:
        live = {
            "event_loop": lambda: True,
            "watcher": lambda: not self._armed or self._watching(),
            "pipeline": lambda: not self._armed or self._pipeline_running(),
        }
        return build_app(live=live, ready=self._ready_checks, status=self.status, registry=self.metrics.registry)

    def _watching(self) -> bool:
        return self.watcher is not None and self.watcher.is_alive()

    def _pipeline_running(self) -> bool:
        return self.pipeline is not None and self.pipeline.running

    @property
    def _ready_checks(self) -> dict[str, Callable[[], bool]]:
        return {
            "watches": lambda: self._armed and self._watching(),
            "pipeline": lambda: self._armed and self._pipeline_running(),
        }

    def status(self) -> dict[str, Any]:
        watcher, pipeline = self.watcher, self.pipeline
        store = pipeline.store if pipeline else None
        jh = pipeline.journal_health if pipeline else None
        journal = pipeline.journal if pipeline else None
        degraded = []
        if store is not None and store.state in ("degraded", "blocked"):
            degraded.append(f"store {store.state}: {store.error_code}: {store.error}")
        if jh is not None and jh.state == "error":
            degraded.append(f"journal write failing, changes kept and retried: {jh.error}")
        if jh is not None and jh.state == "full":
            degraded.append("spool full: journaling paused until the store catches up (changes coalesce)")
        if jh is not None and jh.initial_scan == "waiting":
            degraded.append("index rebuild waiting for the store to be readable")
        if watcher is not None:
            ws = watcher.state
            if ws.unwatched:
                degraded.append(
                    f"{len(ws.unwatched)} directories unwatched (see unwatched; "
                    "for a watch limit raise fs.inotify.max_user_watches)"
                )
            if ws.overflows:
                degraded.append(f"inotify queue overflowed {ws.overflows} times")
            if ws.handler_errors:
                degraded.append(f"{ws.handler_errors} inotify events failed to be handled (see the logs)")
            for root in ws.roots_gone:
                degraded.append(f"watch root gone: {root}")
        ident = self.identity
        return {
            "status": "degraded" if degraded else "ok",
            "degraded_reasons": degraded,
            "version": __version__,
            "identity": {
                "tenant_id": ident.tenant_id,
                "user_id": ident.user_id,
                "session_id": ident.session_id,
                "pod": ident.pod,
            },
            "ready": all(check() for check in self._ready_checks.values()),
            "started_at": rfc3339(self.started_at),
            "watch_roots": [str(r) for r in self.settings.watch_roots],
            "watches": watcher.state.watches if watcher else 0,
            "unwatched": dict(watcher.state.unwatched) if watcher else {},
            "inotify_overflows": watcher.state.overflows if watcher else 0,
            "inotify_backlog_high_water": watcher.backlog_high_water if watcher else 0,
            "recrawls": watcher.state.recrawls if watcher else 0,
            "initial_scan": jh.initial_scan if jh else "pending",
            "pipeline": {"pending_changes": pipeline.pending_hints() if pipeline else 0},
            "journal": {
                "state": jh.state if jh else "unknown",
                "error": jh.error if jh else None,
                "consecutive_failures": jh.consecutive_failures if jh else 0,
                "since": rfc3339(jh.since) if jh else None,
                "index_rebuilds": jh.rebuilds if jh else 0,
                "stream_id": journal.stream_id if journal else None,
            },
            "chain": {
                "stream_id": journal.stream_id if journal else None,
                "batches": journal.chain.batches if journal else 0,
                "head": journal.chain.link.hex() if journal else None,
                "key_id": self.chain_key.id if self.chain_key else None,
            },
            "spool": {
                "batches": journal.outbox_batches if journal else 0,
                "events": journal.outbox_events if journal else 0,
                "bytes": journal.outbox_bytes if journal else 0,
                "max_bytes": self.settings.spool.max_bytes,
                "corrupt_records": pipeline.corrupt_records if pipeline else 0,
                "gaps_recorded": pipeline.gaps if pipeline else 0,
            },
            "store": {
                "backend": self.settings.backend,
                "state": store.state if store else "unknown",
                "error": store.error if store else None,
                "error_code": store.error_code if store else None,
                "consecutive_failures": store.consecutive_failures if store else 0,
                "since": rfc3339(store.since) if store else None,
            },
            "last_commit": rfc3339(store.last_commit) if store and store.last_commit else None,
        }


def _with_companions(db: Path) -> list[Path]:
    """A SQLite file and the files SQLite and the store lock keep beside it."""
    return [db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal", ".lock"))]
