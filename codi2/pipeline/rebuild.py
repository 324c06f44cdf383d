"""The index derived again from the trail, when it may be ahead of it (a lost batch, a recovered journal, a
new journal beside a store that already holds this user's trail).

The trail is the truth and the index is derived from it: the store's events of this user under these roots,
then the outbox's not yet shipped, folded into each entry's last state. Every root is then diffed against
that index (the caller feeds the rescans), so whatever changed that the trail lacks is recorded, nothing
is absorbed silently, and nothing the trail has is recorded twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import structlog

from codi2.disk.fs import Facts, key_of
from codi2.journal.journal import Journal, is_corruption
from codi2.journal.outbox import OutboxBatch, OutboxReader
from codi2.pipeline.flusher import Flusher
from codi2.stores.base import TrailReader
from codi2.trail.events import Event, Identity, Origin
from codi2.trail.replay import fold_events

log = structlog.get_logger("codi2.pipeline.rebuild")

STORE_RETRY_S = 5.0  # the store unreadable: the rebuild (and every flush behind it) waits this long

Row = tuple[str, bytes, Facts]


class IndexRebuild:
    """Run by the journal thread, which reports its failures through the flusher (back-off, recovery)."""

    def __init__(self, identity: Identity, root_names: list[str], flusher: Flusher) -> None:
        self._identity = identity
        self._roots = set(root_names)
        self._flusher = flusher

    def run(self, journal: Journal, trail: TrailReader | None, *, first_start: bool) -> Origin | None:
        """Replace the index with the trail's state. Returns the origin of the diff of every root that must
        follow, or None when it could not be done (it is tried again after a back-off, or a recovery)."""
        self._flusher.health.initial_scan = "waiting"
        try:
            rows = self._derive(journal.path, trail)
        except Exception as exc:
            if is_corruption(exc):  # the outbox, not the store: the journal is recovered, then rebuilt
                self._flusher.failed(exc)
                return None
            log.warning("index_rebuild_waiting", error=str(exc), hint="the store must be readable to rebuild")
            self._flusher.retry_in(STORE_RETRY_S)
            return None
        try:
            with journal.transaction():
                journal.replace_index(rows)
                journal.set_needs_rebuild(False)
                journal.mark_initialized()
        except Exception as exc:
            self._flusher.failed(exc)
            return None
        self._flusher.health.rebuilds += 1
        log.info("index_rebuilt", entries=len(rows))
        # A new journal whose store holds no trail of these roots yet: this is the very first start.
        return "baseline" if first_start and not rows else "offline"

    def _derive(self, outbox: Path, trail: TrailReader | None) -> list[Row]:
        if trail is None:  # a daemon wired wrongly: say so, as for a store that cannot be read
            raise RuntimeError("the daemon sets the store before it starts the pipeline")
        # The outbox first, then the store: a batch the shipper commits (and deletes from the outbox)
        # between the two reads is then in the store's read. Read the other way round it would be in
        # neither, and what it recorded would be recorded again by the diff that follows.
        reader = OutboxReader(outbox)
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
        ident, roots = self._identity, self._roots
        stored: set[str] = set()

        def stored_trail() -> Iterator[Event]:
            for e in trail.user_trail(ident.tenant_id, ident.user_id, roots):
                stored.add(e.id)
                yield e

        state = fold_events(stored_trail())
        # Only what the store does not have yet, in order: a rename folded twice would drop its target.
        state = fold_events((e for e in pending if e.id not in stored), state)
        return [(root, key_of(os.fsencode(path)), _facts(e)) for (root, path), e in state.items()]


def _facts(e: Event) -> Facts:
    """What the trail says of an entry: no stat identity, and no owner from a record written before events
    carried one."""
    target = None if e.target is None else os.fsencode(e.target)
    return Facts(e.type, e.size, e.mode, None, None, None, None, None, e.sha256, e.uid, e.gid, target)
