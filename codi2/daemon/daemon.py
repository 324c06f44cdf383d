"""The daemon's life cycle: start-up, `should_exit`, graceful shutdown, signals, and `/status` composed of
the parts' snapshots. The parts are built in `build.py`.

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
from typing import Any, NoReturn

import structlog

from codi2 import __version__
from codi2.daemon import retention
from codi2.daemon.build import Parts, build_health, connect_store
from codi2.daemon.health import Checks
from codi2.journal.journal import JournalUnavailable
from codi2.pipeline.lifecycle import config_digest
from codi2.ship.shipper import Shipper
from codi2.stores.open import open_sink
from codi2.trail.events import rfc3339
from codi2.watch.watcher import check_root

log = structlog.get_logger("codi2.daemon.daemon")

WATCHER_DRAIN_S = 5.0  # at most, of the shutdown deadline: reading what the kernel queued before the signal
SCAN_PROGRESS_LOG_S = 10.0  # how often a long start-up diff says how far it got
EXIT_FORCED = 1  # a second signal: the process ends without finishing the drain (README: exit codes)


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
    """Starts the parts in order and stops them in reverse: each one that started is pushed onto an
    `AsyncExitStack`, so a start-up that fails half-way stops exactly what had started. The first SIGTERM
    or SIGINT drains until `[server] shutdown_timeout_s`; a second one ends the process at once.
    `/status` is composed of each part's own snapshot."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.settings = s = parts.settings
        self.identity = parts.identity
        self.metrics = parts.metrics
        self.store = parts.store
        self.pipeline = parts.pipeline
        self.watcher = parts.watcher
        self.should_exit = asyncio.Event()
        self.started_at = time.time()
        self._lock = StateLock(s.state_dir)
        self._store_lock = StateLock(s.state_dir, file=s.sqlite_file) if s.backend == "sqlite" else None
        self.shipper: Shipper | None = None  # built once the journal and the store are open
        self._armed = False
        self._deadline = 0.0  # monotonic: when shutdown gives up flushing
        self._lost = 0
        self._ready_checks: Checks = {  # /readyz names each; /status and the metric say whether all hold
            "watches": lambda: self._armed and self.watcher.is_alive(),
            "pipeline": lambda: self._armed and self._pipeline_running(),
        }
        live: Checks = {
            "event_loop": lambda: True,
            "watcher": lambda: not self._armed or self.watcher.is_alive(),
            "pipeline": lambda: not self._armed or self._pipeline_running(),
        }
        self.health = build_health(parts, live=live, ready=self._ready_checks, status=self.status)
        self.metrics.ready.set_function(lambda: float(self._ready()))

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
                self._deadline = time.monotonic() + self.settings.server.shutdown_timeout_s
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
        rules = self.parts.rules
        rules.add_private(s.private_paths())  # the state dir exists now: known by identity too
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
        rules.add_private_files(s.private_files())
        self.shipper = shipper = connect_store(self.parts, sink)
        if shipper is not None:
            shipper.start()
            stack.push_async_callback(self._stop_shipper, shipper)
        digest = config_digest(s.effective())
        await asyncio.to_thread(pipeline.record_start, version=__version__, backend=s.backend, config_sha256=digest)
        pipeline.start()
        stack.push_async_callback(self._stop_pipeline)
        if s.backend == "sqlite" and (max_age := s.retention.max_age_s) is not None:
            task = retention.apply_daily(pipeline, s.sqlite_file, self.identity.tenant_id, max_age)
            stack.callback(asyncio.create_task(task, name="codi2-retention").cancel)
        try:
            await asyncio.to_thread(self.watcher.start)
        except OSError as exc:
            where = "" if exc.filename is None else f" {exc.filename}"
            raise StartupError(f"cannot watch{where}: {exc.strerror}") from None
        stack.push_async_callback(self._stop_watcher)
        # Watches first, then the walk: a change made meanwhile is seen live, by the walk, or both (the
        # second look finds nothing new), never by neither. Ready now: whatever changes from here on
        # reaches the trail, and the start-up diff goes on in the background (see /status).
        pipeline.initial_scan()
        stack.callback(asyncio.create_task(self._retry_unwatched(), name="codi2-unwatched").cancel)
        stack.callback(asyncio.create_task(self._scan_progress(), name="codi2-scan-progress").cancel)
        self._armed = True

    async def _stop_watcher(self) -> None:
        """The kernel's queue read to a barrier, within the shutdown deadline: what it holds is journaled."""
        drain = min(WATCHER_DRAIN_S, max(0.0, self._deadline - time.monotonic()))
        await asyncio.to_thread(self.watcher.stop, drain)

    async def _stop_pipeline(self) -> None:
        self._lost = await asyncio.to_thread(self.pipeline.stop, self._deadline)

    async def _stop_shipper(self, shipper: Shipper) -> None:
        await asyncio.to_thread(shipper.stop, self._deadline)
        await asyncio.to_thread(self.pipeline.settle_acks)  # the journal thread has stopped before the shipper
        journal = self.pipeline.journal
        if journal is not None and journal.outbox_events:
            log.warning(
                "events_left_in_spool",
                count=journal.outbox_events,
                store=self.store.health.error,
                note="committed at the next start",
            )

    async def _scan_progress(self) -> None:
        """A log line now and then while the start-up diff runs: on a large workspace it takes minutes."""
        while True:
            await asyncio.sleep(SCAN_PROGRESS_LOG_S)
            if self.pipeline.journal_health.initial_scan != "running":
                return
            log.info("initial_scan_progress", **self.pipeline.scan_progress())

    async def _retry_unwatched(self) -> None:
        """Directories without a watch (watch limit, permissions) are retried, and diffed, periodically;
        so is the recrawl of a watcher that ran out of descriptors."""
        while True:
            await asyncio.sleep(self.settings.monitoring.rescan_interval_s)
            if self.watcher.state.unwatched or self.watcher.state.out_of_descriptors:
                self.watcher.request(self.watcher.retry_unwatched)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.should_exit.is_set():
            self._force_exit(sig)
        log.info("shutdown_requested", signal=sig.name, timeout_s=self.settings.server.shutdown_timeout_s)
        self.should_exit.set()

    def _force_exit(self, sig: signal.Signals) -> NoReturn:
        """A second signal: whoever sent it wants the process gone now, not after the drain (a thread may be
        blocked in the store's client for a while). It ends as a SIGKILL would, after one line saying what
        was left: nothing is lost, the journal being durable; the next start ships what waits in the outbox,
        and its diff finds what was observed but not journaled."""
        journal = self.pipeline.journal
        log.error(
            "shutdown_forced",
            signal=sig.name,
            changes_not_journaled=self.pipeline.pending_hints(),
            events_left_in_spool=journal.outbox_events if journal is not None else 0,
            note="the next start ships the spool and its diff finds the changes",
        )
        os._exit(EXIT_FORCED)

    # What the health server reads ----------------------------------------------------------------

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
