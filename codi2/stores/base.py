"""Where audit events are committed. A sink knows batches and queries, nothing of watching."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from codi2.trail.events import Batch, BatchHeader, Event, EventQuery

Cursor = int | bytes


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """A chained batch as a store holds it: its header, and where its events are (the sink's own locator,
    which `batch_events` reads; it is not part of what the link covers)."""

    header: BatchHeader
    where: Any


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """A stream's registry entry: whose it is, and the head (stream, number, link) of the stream it succeeds,
    that user's and pod's previous one as the store found it when this one began (None: it succeeds none, or
    was stored before the registry was). `verify` reports a predecessor that is gone as `missing_stream`."""

    stream_id: str
    user_id: str
    pod: str
    first_ts: str
    predecessor: tuple[str, int, bytes] | None


class StoreError(Exception):
    """A store failure. `code` (always a str) names it for /status and metrics. `retryable` is False when
    the batch can never commit as it is (an event over the store's limits): retrying cannot help, and the
    pipeline must keep the batch, never drop it, and report the store as blocked."""

    def __init__(self, message: str, code: str = "error", *, retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class BatchWriter(Protocol):
    """What the daemon's shipper needs of a store. Blocking by design: called from one worker thread."""

    name: str

    def write_batch(self, batch: Batch) -> None:
        """Commit every event of the batch, each exactly once, however often the batch is written and however
        much of it an earlier attempt committed, and its header (if any) with it, once, where `batches` and
        `batch_events` find both. StoreError(retryable=False): the batch can never commit."""

    def draining_backlog(self, draining: bool) -> None:
        """The shipper is replaying a backlog (`True`) or keeping up again (`False`): a shared store may serve
        the backlog's writes after interactive traffic."""

    def ping(self) -> None:
        """Raise StoreError unless a write could be committed now."""

    def close(self) -> None:
        """Release connections; safe to call twice."""


class TrailReader(Protocol):
    """What the CLI (`events`, `verify`, `test`) and the index rebuild need of a store."""

    def read(self, query: EventQuery, after: Cursor | None = None) -> Iterator[tuple[Cursor, Event]]:
        """Yield matching events in commit order, after the given cursor."""
        ...

    def streams(self, tenant_id: str) -> list[str]:
        """The ids of the tenant's streams: those with at least one chained batch stored."""
        ...

    def registry(self, tenant_id: str) -> list[StreamEntry]:
        """The tenant's streams registry, oldest entry first where the store knows the order."""
        ...

    def user_trail(self, tenant_id: str, user_id: str, roots: Collection[str]) -> Iterator[Event]:
        """One user's events under these watch roots, in commit order (the daemon's index rebuild): read
        through that user's streams where the store can, not the tenant's whole trail."""
        ...

    def batches(self, tenant_id: str, stream_id: str) -> Iterator[StoredBatch]:
        """The stream's stored batch headers in batch-number order."""
        ...

    def batch_events(self, tenant_id: str, batch: StoredBatch) -> list[tuple[Cursor, Event]]:
        """The events stored for a batch, in commit order, with the cursors `read` gives them."""
        ...

    def probe(self, tenant_id: str) -> None:
        """Write, read back and clear a probe record under the tenant's scope (`codi2 test`)."""

    def close(self) -> None:
        """Release connections; safe to call twice."""


# Retention (docs/retention.md) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Horizon:
    """The last batch of a stream pruned: what its first live batch must follow (`codi2 verify`)."""

    number: int
    link: bytes
    ts: str


@dataclass(frozen=True, slots=True)
class PrunedStream:
    """One stream's part of a retention plan: the horizon it had, and the one a prune gives it."""

    previous: Horizon | None
    horizon: Horizon
    batches: int  # batches after `previous`, up to and with `horizon`
    events: int


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """What a prune before `before` removes: per stream, the batches up to its new horizon, and everything
    before `bound` in commit order (the backend's own position), events in no batch included."""

    tenant_id: str
    before: datetime
    streams: dict[str, PrunedStream]
    bound: Any
    legacy: bool = False  # FDB: layout v1's keys go too (all of them older than `before`)


@runtime_checkable
class TrailAdmin(Protocol):
    """What `codi2 archive`, `prune` and `delete-tenant` need of a store: one policy for every backend."""

    def horizons(self, tenant_id: str) -> dict[str, Horizon]:
        """Each pruned stream's horizon."""
        ...

    def retention_plan(self, tenant_id: str, before: datetime) -> RetentionPlan:
        """Per stream, the last batch wholly before `before` (and after its horizon, if any) that can go
        with everything committed before it: a read, nothing changes."""
        ...

    def unchained_before(self, plan: RetentionPlan) -> Iterator[Event]:
        """The events in no batch (written before chaining) that pruning `plan` removes, in commit order."""
        ...

    def prune(self, plan: RetentionPlan) -> None:
        """Write the plan's horizons first, then clear what they cover in bounded transactions; running it
        again after an interruption finishes it."""

    def delete_tenant(self, tenant_id: str) -> None:
        """Remove everything stored for the tenant (every layout)."""


class Sink(BatchWriter, TrailReader, TrailAdmin, Protocol):
    """A backend: both faces (a module or package per backend under `codi2/stores/`, chosen by `stores.open`)."""
