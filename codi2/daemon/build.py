"""The daemon's parts built from the settings and wired to each other, none of them started.

Building reads nothing but the chain key, so every configuration problem is found before anything runs;
starting, stopping and signals are `daemon.py`'s (uvicorn's `Config.load` apart from its `Server`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codi2.config import ConfigError, Settings
from codi2.daemon.health import Checks, HealthServer, build_app
from codi2.disk.ignore import IgnoreRules
from codi2.metrics import Metrics
from codi2.pipeline.pipeline import JournalFile, Pipeline
from codi2.ship.shipper import Shipper, StoreMonitor
from codi2.stores.base import Sink
from codi2.trail.chain import ChainKey, load_key
from codi2.trail.events import Identity
from codi2.watch.watcher import Watcher


@dataclass(frozen=True)
class Parts:
    """What one daemon runs: the watcher feeds the pipeline (the journal thread), both report to the metrics.
    The store and its shipper come later, once the journal is open (with SQLite the store is its file)."""

    settings: Settings
    identity: Identity
    metrics: Metrics
    rules: IgnoreRules
    store: StoreMonitor
    pipeline: Pipeline
    watcher: Watcher


def build(settings: Settings, identity: Identity) -> Parts:
    """Every part from the settings; a bad integrity key is a ConfigError, as a bad value in the file is."""
    s = settings
    try:
        chain_key: ChainKey | None = load_key(s.integrity.key_file) if s.integrity.key_file is not None else None
    except ValueError as exc:
        raise ConfigError(f"integrity.key_file: {exc}") from None
    metrics = Metrics()
    rules = IgnoreRules(s.monitoring.ignore_patterns, s.watch_roots)  # and the private places at start-up
    store = StoreMonitor(metrics)
    local = None
    if s.backend == "sqlite":  # the store's file holds the journal too: one file, one commit
        from codi2.stores.sqlite import LocalStore

        local = LocalStore()
    journal_file = JournalFile(
        path=s.sqlite_file if local else s.journal_file,
        state_dir=s.state_dir,
        local_store=local,
        chain_key=chain_key,
    )
    pipeline = Pipeline(
        roots=s.watch_roots,
        journal_file=journal_file,
        rules=rules,
        identity=identity,
        metrics=metrics,
        store=store,
        batching=s.batching,
        spool=s.spool,
        monitoring=s.monitoring,
    )

    def overflow() -> None:
        """Watcher thread, after IN_Q_OVERFLOW: the watcher recrawls; the trail notes the lost history."""
        metrics.inotify_overflows.inc()
        pipeline.note_gap("inotify_overflow", None)

    def descriptors_back() -> None:
        """Watcher thread, once it recrawled every tree after running out of descriptors: what it could not
        follow meanwhile is recorded as its end state, and the trail notes the lost history."""
        pipeline.note_gap("out_of_descriptors", None)

    def mounts_changed() -> None:
        """Watcher thread, when a mount inside a root came or went (the watcher recrawls where): what it
        covered or uncovered changed with no kernel event, so the trail notes the lost history."""
        pipeline.note_gap("mount_changed", None)

    watcher = Watcher(
        s.watch_roots,
        rules,
        s.state_dir / "barrier",
        on_hints=pipeline.feed,
        on_overflow=overflow,
        on_descriptors_back=descriptors_back,
        on_mounts_changed=mounts_changed,
        check_interval_s=s.monitoring.rescan_interval_s,
    )
    _gauges(metrics, pipeline, watcher)
    return Parts(s, identity, metrics, rules, store, pipeline, watcher)


def connect_store(parts: Parts, sink: Sink) -> Shipper | None:
    """The store, once open, wired in: the journal thread reads the trail back from it (to rebuild the
    index), and with FoundationDB a shipper, not started, takes the outbox to it. None with SQLite, whose
    journal commit is the store's. Call it once the journal is open."""
    pipeline = parts.pipeline
    pipeline.trail = sink
    if parts.settings.backend == "sqlite":
        return None
    assert pipeline.journal is not None, "the journal opens before the store"
    shipper = Shipper(
        pipeline.journal,
        sink,
        parts.store,
        on_batch_lost=pipeline.outbox_batch_lost,
        on_outbox_corrupt=pipeline.request_rebuild,  # reading the outbox there finds it and recovers
    )
    pipeline.on_committed = shipper.hand
    pipeline.on_new_journal = shipper.renew
    return shipper


def build_health(parts: Parts, *, live: Checks, ready: Checks, status: Callable[[], dict[str, Any]]) -> HealthServer:
    """The health port; what it answers is the daemon's (`/status` is composed of every part's snapshot)."""
    app = build_app(live=live, ready=ready, status=status, registry=parts.metrics.registry)
    return HealthServer(app, parts.settings.server.host, parts.settings.server.port)


def _gauges(m: Metrics, pipeline: Pipeline, watcher: Watcher) -> None:
    m.inotify_watches.set_function(lambda: watcher.state.watches)
    m.unwatched_dirs.set_function(lambda: len(watcher.state.unwatched))
    m.spool_events.set_function(lambda: pipeline.journal.outbox_events if pipeline.journal else 0)
    m.spool_bytes.set_function(lambda: pipeline.journal.outbox_bytes if pipeline.journal else 0)
    m.spool_max_bytes.set(pipeline.max_bytes)
    m.pipeline_queue.set_function(pipeline.pending_hints)
    m.handler_errors.source = lambda: float(watcher.state.handler_errors)
    m.roots_gone.set_function(lambda: len(watcher.state.roots_gone))
    m.roots_reestablished.source = lambda: float(watcher.state.roots_reestablished)
