"""The daemon's life cycle in one class: start-up, `should_exit`, graceful shutdown, signals.

Everything that blocks runs in a thread: the event loop only serves the health port.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import signal
import time
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

import structlog

from codi2 import __version__
from codi2.config import ConfigError, Settings
from codi2.daemon.health import HealthServer, build_app
from codi2.disk.ignore import IgnoreRules
from codi2.journal.journal import FILE_NAME, JournalUnavailable
from codi2.metrics import Metrics
from codi2.pipeline.pipeline import Pipeline
from codi2.ship.shipper import Shipper, StoreMonitor
from codi2.stores.base import open_sink
from codi2.trail.chain import load_key
from codi2.trail.events import Identity, rfc3339
from codi2.watch.watcher import Watcher, check_root

log = structlog.get_logger("codi2.daemon.daemon")

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
    """Builds the components from the settings, starts them in order, and stops them in reverse: each
    one that started is pushed onto an `AsyncExitStack`, so a start-up that fails half-way stops exactly
    what had started. `/status` is composed of each component's own snapshot."""

    def __init__(self, settings: Settings, identity: Identity) -> None:
        self.settings = s = settings
        self.identity = identity
        self.metrics = Metrics()
        self.should_exit = asyncio.Event()
        self.started_at = time.time()
        key_file = s.integrity.key_file
        try:
            self.chain_key = load_key(key_file) if key_file is not None else None
        except ValueError as exc:
            raise ConfigError(f"integrity.key_file: {exc}") from None
        self._lock = StateLock(s.state_dir)
        self._store_lock = StateLock(s.state_dir, file=s.sqlite_file) if s.backend == "sqlite" else None
        self.rules = IgnoreRules(s.monitoring.ignore_patterns, s.watch_roots)  # and private places at start-up
        self.store = StoreMonitor(self.metrics)
        local = None
        if s.backend == "sqlite":  # the store's file holds the journal too: one file, one commit
            from codi2.stores.sqlite import LocalStore

            local = LocalStore()
        self.pipeline = Pipeline(
            roots=s.watch_roots,
            state_dir=s.state_dir,
            journal_path=s.sqlite_file if local else s.state_dir / FILE_NAME,
            local_store=local,
            rules=self.rules,
            identity=identity,
            metrics=self.metrics,
            max_events=s.batching.max_events,
            max_batch_bytes=s.batching.max_bytes,
            max_delay_ms=s.batching.max_delay_ms,
            max_bytes=s.spool.max_bytes,
            hash_max_bytes=s.monitoring.hash_max_bytes,
            fsync=s.spool.fsync,
            initial_scan=s.monitoring.initial_scan,
            store=self.store,
            chain_key=self.chain_key,
        )
        self.watcher = Watcher(
            s.watch_roots,
            self.rules,
            s.state_dir / "barrier",
            on_hints=self.pipeline.feed,
            on_overflow=self._overflow,
            on_descriptors_back=self._descriptors_back,
            on_mounts_changed=lambda: self.pipeline.note_gap("mount_changed", None),
            check_interval_s=s.monitoring.rescan_interval_s,
        )
        self.shipper: Shipper | None = None  # built once the journal and the store are open
        self._ready_checks = {  # /readyz names each; /status and the metric say whether all hold
            "watches": lambda: self._armed and self.watcher.is_alive(),
            "pipeline": lambda: self._armed and self._pipeline_running(),
        }
        self.health = HealthServer(self._app(), s.server.host, s.server.port)
        self._armed = False
        self._deadline = 0.0  # monotonic: when shutdown gives up flushing
        self._lost = 0
        self._gauges()

    # Life cycle ----------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT; 0 when every observed change reached the journal."""
        self._install_signal_handlers()
        async with AsyncExitStack() as stack:
            try:
                await self.startup(stack)
                log.info(
                    "codi2_ready",
                    version=__version__,
                    backend=self.settings.backend,
                    roots=[str(r) for r in self.settings.watch_roots],
                    watches=self.watcher.state.watches,
                    health_port=self.health.port,
                    open_files_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                )
                await self.should_exit.wait()
            finally:
                self._armed = False
                self._deadline = time.monotonic() + SHUTDOWN_FLUSH_S
        log.info("codi2_stopped", uncommitted=self._lost)
        return 0 if self._lost == 0 else 1

    async def startup(self, stack: AsyncExitStack) -> None:
        """Start-up order: health port first (probes answer while watches are placed; `/readyz` says 503
        until they are), then the locks, the journal, the store, the shipper, the journal thread, the
        watcher and the start-up diff. The stack stops them in reverse: read every change the kernel
        queued (a watcher barrier), journal it, ship what the store takes in time, close."""
        s = self.settings
        _raise_open_files_limit()
        try:
            await self.health.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {s.server.bind_addr}: {exc.strerror or exc}") from None
        stack.push_async_callback(self.health.stop)
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
        stack.callback(self._lock.release)
        if self._store_lock is not None:
            try:
                await asyncio.to_thread(self._store_lock.acquire)
            except OSError as exc:
                raise StartupError(f"cannot lock {self._store_lock.path}: {exc.strerror or exc}") from None
            stack.callback(self._store_lock.release)
        self.rules.add_private(self._private_paths())  # the state dir exists now: known by identity too
        pipeline = self.pipeline
        try:
            # The journal first: with SQLite it is the store's file, and a damaged one is recovered there.
            await asyncio.to_thread(pipeline.open)
        except JournalUnavailable as exc:
            raise StartupError(f"cannot open the journal {exc}") from None
        except OSError as exc:
            raise StartupError(f"cannot open the journal in {s.state_dir}: {exc.strerror or exc}") from None
        stack.push_async_callback(asyncio.to_thread, pipeline.close)
        try:
            sink = await asyncio.to_thread(open_sink, s)
        except Exception as exc:
            raise StartupError(f"cannot open the {s.backend} store: {exc}") from None
        stack.push_async_callback(asyncio.to_thread, sink.close)
        pipeline.trail = sink
        self.rules.add_private_files(self._private_files())
        if s.backend != "sqlite":
            assert pipeline.journal is not None
            self.shipper = shipper = Shipper(
                pipeline.journal,
                sink,
                self.store,
                on_batch_lost=pipeline.outbox_batch_lost,
                on_outbox_corrupt=pipeline.request_rebuild,  # reading the outbox there finds it and recovers
            )
            pipeline.on_committed = shipper.hand
            pipeline.on_new_journal = shipper.renew
            shipper.start()
            stack.push_async_callback(self._stop_shipper, shipper)
        pipeline.start()
        stack.push_async_callback(self._stop_pipeline)
        try:
            await asyncio.to_thread(self.watcher.start)
        except OSError as exc:
            where = "" if exc.filename is None else f" {exc.filename}"
            raise StartupError(f"cannot watch{where}: {exc.strerror}") from None
        stack.push_async_callback(asyncio.to_thread, self.watcher.stop, WATCHER_DRAIN_S)
        # Watches first, then the walk: a change made meanwhile is seen live, by the walk, or both (the
        # second look finds nothing new), never by neither. Ready now: whatever changes from here on
        # reaches the trail, and the start-up diff goes on in the background (see /status).
        pipeline.initial_scan()
        stack.callback(asyncio.create_task(self._retry_unwatched(), name="codi2-unwatched").cancel)
        self._armed = True

    async def _stop_pipeline(self) -> None:
        self._lost = await asyncio.to_thread(self.pipeline.stop, self._deadline)

    async def _stop_shipper(self, shipper: Shipper) -> None:
        await asyncio.to_thread(shipper.stop, self._deadline)
        journal = self.pipeline.journal
        if journal is not None and journal.outbox_events:
            log.warning(
                "events_left_in_spool",
                count=journal.outbox_events,
                store=self.store.health.error,
                note="committed at the next start",
            )

    def _overflow(self) -> None:
        """Watcher thread, after IN_Q_OVERFLOW: the watcher recrawls; the trail notes the lost history."""
        self.metrics.inotify_overflows.inc()
        self.pipeline.note_gap("inotify_overflow", None)

    def _descriptors_back(self) -> None:
        """Watcher thread, once it recrawled every tree after running out of descriptors: what it could not
        follow meanwhile is recorded as its end state, and the trail notes the lost history."""
        self.pipeline.note_gap("out_of_descriptors", None)

    async def _retry_unwatched(self) -> None:
        """Directories without a watch (watch limit, permissions) are retried, and diffed, periodically;
        so is the recrawl of a watcher that ran out of descriptors."""
        while True:
            await asyncio.sleep(self.settings.monitoring.rescan_interval_s)
            if self.watcher.state.unwatched or self.watcher.state.out_of_descriptors:
                self.watcher.request(self.watcher.retry_unwatched)

    def _gauges(self) -> None:
        m, pipeline, watcher = self.metrics, self.pipeline, self.watcher
        m.inotify_watches.set_function(lambda: watcher.state.watches)
        m.unwatched_dirs.set_function(lambda: len(watcher.state.unwatched))
        m.spool_events.set_function(lambda: pipeline.journal.outbox_events if pipeline.journal else 0)
        m.spool_bytes.set_function(lambda: pipeline.journal.outbox_bytes if pipeline.journal else 0)
        m.spool_max_bytes.set(pipeline.max_bytes)
        m.pipeline_queue.set_function(pipeline.pending_hints)
        m.ready.set_function(lambda: float(self._ready()))
        m.handler_errors.source = lambda: float(watcher.state.handler_errors)
        m.roots_gone.set_function(lambda: len(watcher.state.roots_gone))
        m.roots_reestablished.source = lambda: float(watcher.state.roots_reestablished)

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
            "watcher": lambda: not self._armed or self.watcher.is_alive(),
            "pipeline": lambda: not self._armed or self._pipeline_running(),
        }
        return build_app(live=live, ready=self._ready_checks, status=self.status, registry=self.metrics.registry)

    def _pipeline_running(self) -> bool:
        return self.pipeline.running and (self.shipper is None or self.shipper.running)

    def _ready(self) -> bool:
        return all(check() for check in self._ready_checks.values())

    def status(self) -> dict[str, Any]:
        degraded = self.store.degraded() + self.pipeline.degraded() + self.watcher.degraded()
        if self._armed:  # a thread that died of an unexpected error: /livez fails too, and a restart recovers
            stopped = [
                name
                for name, alive in (
                    ("watcher", self.watcher.is_alive()),
                    ("journal", self.pipeline.running),
                    ("shipper", self.shipper is None or self.shipper.running),
                )
                if not alive
            ]
            degraded += [f"{name} thread stopped (see the logs for the error)" for name in stopped]
        ident = self.identity
        last_commit = self.store.health.last_commit
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
            "ready": self._ready(),
            "started_at": rfc3339(self.started_at),
            "watch_roots": [str(r) for r in self.settings.watch_roots],
            **self.watcher.snapshot(),
            **self.pipeline.snapshot(),
            "store": self.store.snapshot(self.settings.backend),
            "last_commit": rfc3339(last_commit) if last_commit else None,
        }


def _raise_open_files_limit() -> None:
    """The soft limit on open descriptors raised to the hard one: the watcher and the reconciler hold one
    per level of the tree they walk, and 1024, a common soft default, is shallower than a generated tree
    may be. Short of descriptors all the same, they report it and try again, never skip silently."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _with_companions(db: Path) -> list[Path]:
    """A SQLite file and the files SQLite and the store lock keep beside it."""
    return [db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal", ".lock"))]
