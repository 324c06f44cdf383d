"""Prometheus metrics of one daemon, in a registry of its own so several daemons can share a process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from codi2.trail.events import ACTIONS

DROP_REASONS = ("shutdown_timeout", "pipeline_error")


class Metrics:
    def __init__(self) -> None:
        # Without this, every counter and histogram also exports `<name>_created`, the time it was made: one
        # series per counter and label set that no rule or panel reads, doubling what is scraped from every
        # pod. Process-wide, which suits the daemon (it owns its process); set before any metric is made.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_start_time_seconds (the restart-loop alert), memory and CPU, as the default registry has them
        ProcessCollector(registry=r)
        self.events_observed = Counter(
            "codi2_events_observed", "Audit events produced from file changes", ["action"], registry=r
        )
        self.events_committed = Counter("codi2_events_committed", "Audit events committed to the store", registry=r)
        self.events_dropped = Counter(
            "codi2_events_dropped", "Audit events that could not be kept, by reason", ["reason"], registry=r
        )
        self.store_errors = Counter("codi2_store_errors", "Failed batch commits, by error", ["error"], registry=r)
        self.batch_commit_duration = Histogram(
            "codi2_batch_commit_duration_seconds",
            "Time to commit one batch to the store",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.pipeline_queue = Gauge(
            "codi2_pipeline_queue_events", "Changes reported by the watcher and not yet journaled", registry=r
        )
        self.inotify_watches = Gauge("codi2_inotify_watches", "inotify watches in place", registry=r)
        self.inotify_overflows = Counter(
            "codi2_inotify_overflows", "Kernel inotify queue overflows (IN_Q_OVERFLOW)", registry=r
        )
        self.spool_events = Gauge("codi2_spool_events", "Events in the spool not yet committed", registry=r)
        self.spool_bytes = Gauge("codi2_spool_bytes", "Bytes of spooled batches not yet committed", registry=r)
        self.spool_max_bytes = Gauge(
            "codi2_spool_max_bytes", "Spool size at which journaling pauses (changes then coalesce)", registry=r
        )
        self.spool_corrupt_records = Counter(
            "codi2_spool_corrupt_records", "Spool (outbox) batches found corrupt and lost", registry=r
        )
        self.gaps = Counter("codi2_gaps", "Gap markers recorded: history before them is incomplete", registry=r)
        self.store_blocked = Gauge(
            "codi2_store_blocked", "1 while the oldest batch fails with an error retrying cannot fix", registry=r
        )
        self.journal_errors = Counter(
            "codi2_journal_errors",
            "Failed journal writes (the changes are kept and retried), by error",
            ["error"],
            registry=r,
        )
        self.event_commit_lag = Gauge(
            "codi2_event_commit_lag_seconds", "Age of the oldest event of the last committed batch", registry=r
        )
        self.rescans = Counter("codi2_rescans", "Trees diffed against the index, by origin", ["origin"], registry=r)
        for action in ACTIONS:  # every series exists from the start, so rate() and alerts see zeros
            self.events_observed.labels(action=action)
        for reason in DROP_REASONS:
            self.events_dropped.labels(reason=reason)
        self.unwatched_dirs = Gauge("codi2_unwatched_directories", "Directories that could not be watched", registry=r)
        self.ready = Gauge("codi2_ready", "1 while every /readyz check passes", registry=r)
        self.handler_errors = _DerivedCounter(
            "codi2_inotify_handler_errors", "Kernel events the watcher failed to handle (see the logs)"
        )
        r.register(self.handler_errors)
        self.roots_gone = Gauge("codi2_watch_roots_gone", "Watch roots whose path holds no directory now", registry=r)
        self.roots_reestablished = _DerivedCounter(
            "codi2_watch_roots_reestablished", "Watch roots watched again after being removed, replaced or renamed away"
        )
        r.register(self.roots_reestablished)


class _DerivedCounter(Collector):
    """A counter whose value another component keeps (the watcher counts in its own thread)."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._doc = documentation
        self.source: Callable[[], float] = lambda: 0.0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._doc, value=self.source())
