"""The daemon's life cycle in one class: start-up, `should_exit`, graceful shutdown, signals.

Start-up order: health port first (probes answer while watches are placed, `/readyz` says 503 until they
are), then sink, pipeline, watcher. Shutdown order: read every change the kernel queued (watcher
barrier), flush the pipeline to the store, close the store, stop the health port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from codi2 import __version__
from codi2.config import Settings
from codi2.events import rfc3339
from codi2.health import HealthServer, build_app
from codi2.index import FileIndex
from codi2.metrics import Metrics
from codi2.pipeline import Identity, Pipeline
from codi2.sinks import Sink, open_sink
from codi2.spool import DiskSpool
from codi2.watcher import IgnoreRules, Watcher

log = structlog.get_logger("codi2.daemon")

SHUTDOWN_FLUSH_S = 20.0
WATCHER_DRAIN_S = 5.0


class StartupError(Exception):
    """The daemon cannot start; the message is one line for the operator."""


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
        self.spool: DiskSpool | None = None
        self.index: FileIndex | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._armed = False

    # Life cycle ----------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT; 0 when every observed event reached the store."""
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
        try:
            self.sink = await asyncio.to_thread(self._open_store, s)
        except Exception as exc:
            raise StartupError(f"cannot open the {s.backend} store: {exc}") from None
        rules = IgnoreRules(s.monitoring.ignore_patterns, self._private_paths())
        self.spool = DiskSpool(
            s.state_dir / "spool",
            max_bytes=s.spool.max_bytes,
            segment_bytes=s.spool.segment_bytes,
            fsync=s.spool.fsync,
        )
        self.index = await asyncio.to_thread(FileIndex, s.state_dir / "index.db")
        await asyncio.to_thread(self._recover)
        roots = [os.fsencode(r) for r in s.watch_roots]
        self.pipeline = Pipeline(
            roots=roots,
            rules=rules,
            identity=self.identity,
            sink=self.sink,
            spool=self.spool,
            index=self.index,
            metrics=self.metrics,
            max_events=s.batching.max_events,
            max_bytes=s.batching.max_bytes,
            max_delay_ms=s.batching.max_delay_ms,
            hash_max_bytes=s.monitoring.hash_max_bytes,
        )
        feed = self.pipeline.start()
        self.watcher = Watcher(
            s.watch_roots, rules, s.state_dir / "barrier", on_changes=feed, on_overflow=self._overflow
        )
        self._gauges()
        try:
            await asyncio.to_thread(self.watcher.start)
        except OSError as exc:
            raise StartupError(f"cannot watch {exc.filename}: {exc.strerror}") from None
        # Watches first, then the walk: a change made meanwhile is seen live, by the walk, or both (the
        # pipeline drops the second report), never by neither.
        baseline = not self.index.initialized and s.monitoring.initial_scan == "baseline"
        self.pipeline.request_initial_scan([(i, b"") for i in range(len(roots))], baseline=baseline)
        self._tasks.append(asyncio.create_task(self._rescan_unwatched(), name="codi2-rescan"))
        self._armed = True
        # Ready once the start-up walk is done: what changes after this is in the trail, watched or not.
        await self.pipeline.initial_scan_done.wait()

    def _recover(self) -> None:
        """Worker thread: load unacknowledged batches and roll the index forward over them."""
        assert self.spool is not None and self.index is not None
        pending = self.spool.recover()
        self.metrics.spool_corrupt_records.inc(self.spool.corrupt_records)
        applied = self.index.position
        for item in pending:
            if applied is None or (item.segment, item.end) > applied:
                self.index.apply(item.batch.events, item.facts, (item.segment, item.end))
        if pending:
            log.info("spool_recovered", batches=len(pending), events=self.spool.pending_events)

    def _overflow(self) -> None:
        """Watcher thread, after IN_Q_OVERFLOW: changes were lost, so diff every root against the index."""
        self.metrics.inotify_overflows.inc()
        if self.pipeline is not None:
            self.pipeline.request_rescan("rescan", [(i, b"") for i in range(len(self.settings.watch_roots))])

    async def _rescan_unwatched(self) -> None:
        """Directories without a watch (watch limit) are covered by a periodic diff against the index."""
        while True:
            await asyncio.sleep(self.settings.monitoring.rescan_interval_s)
            if self.watcher is None or self.pipeline is None or not self.watcher.state.unwatched:
                continue
            trees = [t for t in map(self.pipeline.root_of, list(self.watcher.state.unwatched)) if t is not None]
            self.pipeline.request_rescan("rescan", trees)

    def _gauges(self) -> None:
        m, spool = self.metrics, self.spool
        assert spool is not None
        m.inotify_watches.set_function(lambda: self.watcher.state.watches if self.watcher else 0)
        m.unwatched_dirs.set_function(lambda: len(self.watcher.state.unwatched) if self.watcher else 0)
        m.spool_events.set_function(lambda: spool.pending_events)
        m.spool_bytes.set_function(lambda: spool.pending_bytes)
        m.spool_max_bytes.set(spool.max_bytes)

    async def shutdown(self) -> int:
        lost = 0
        self._armed = False
        for task in self._tasks:
            task.cancel()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop, WATCHER_DRAIN_S)
        if self.pipeline is not None and self.pipeline.queue is not None:
            lost = await self.pipeline.stop(SHUTDOWN_FLUSH_S)
            if lost:
                log.error("events_not_spooled", count=lost)
            if self.spool is not None and self.spool.pending_events:
                log.warning(
                    "events_left_in_spool",
                    count=self.spool.pending_events,
                    store=self.pipeline.store.error,
                    note="committed at the next start",
                )
        if self.index is not None:
            await asyncio.to_thread(self.index.close)
        if self.sink is not None:
            await asyncio.to_thread(self.sink.close)
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
            paths += [db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]
        return paths

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
            "initial_scan": lambda: self.pipeline is not None and self.pipeline.initial_scan_done.is_set(),
            "pipeline": lambda: self._armed and self._pipeline_running(),
        }

    def status(self) -> dict[str, Any]:
        watcher, pipeline = self.watcher, self.pipeline
        store = pipeline.store if pipeline else None
        degraded = []
        if store is not None and store.state == "degraded":
            degraded.append(f"store: {store.error_code}: {store.error}")
        if watcher is not None and watcher.state.unwatched:
            degraded.append(
                f"{len(watcher.state.unwatched)} directories unwatched (see unwatched; "
                "for a watch limit raise fs.inotify.max_user_watches)"
            )
        if watcher is not None and watcher.state.overflows:
            degraded.append(f"inotify queue overflowed {watcher.state.overflows} times")
        if watcher is not None and watcher.state.handler_errors:
            degraded.append(f"{watcher.state.handler_errors} inotify events failed to be handled (see the logs)")
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
            "pipeline": {"queued_changes": len(pipeline.queue) if pipeline and pipeline.queue else 0},
            "spool": {
                "events": self.spool.pending_events if self.spool else 0,
                "bytes": self.spool.pending_bytes if self.spool else 0,
                "max_bytes": self.settings.spool.max_bytes,
                "corrupt_records": self.spool.corrupt_records if self.spool else 0,
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
