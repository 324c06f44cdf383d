"""Events as the pipeline records them: this daemon's identity, the journal's next sequence number and the
time of the observation, around what the reconciler found. One place, so the reconciler's events and the
pipeline's own `gap` events cannot disagree on any of it."""

from __future__ import annotations

import os
from collections.abc import Callable

import structlog

from codi2.disk.fs import Facts
from codi2.trail.events import Action, Event, Identity, Origin, now_rfc3339, rfc3339_ns, uuid7

log = structlog.get_logger("codi2.pipeline.factory")


class EventFactory:
    """Builds every event of one daemon. `next_seq` hands out the journal's sequence numbers (taken in
    the transaction that appends the event, so a rolled-back batch gives them back)."""

    def __init__(self, identity: Identity, root_names: list[str], next_seq: Callable[[], int]) -> None:
        self._identity = identity
        self._root_names = root_names
        self._next_seq = next_seq

    def observed(
        self, action: Action, root: int, rel: bytes, dest: bytes | None, facts: Facts, origin: Origin
    ) -> Event:
        """What the reconciler found at `rel` (and `dest`): on the hot path of a burst, so built positionally."""
        ident = self._identity
        mtime = facts.mtime_ns
        return Event(
            uuid7(),
            self._next_seq(),
            now_rfc3339(),
            ident.tenant_id,
            ident.user_id,
            ident.session_id,
            ident.pod,
            action,
            os.fsdecode(rel),
            None if dest is None else os.fsdecode(dest),
            self._root_names[root],
            facts.type,
            facts.size,
            facts.mode,
            None if mtime is None else rfc3339_ns(mtime),
            facts.sha256,
            origin,
            facts.uid,
            facts.gid,
            None if facts.target is None else os.fsdecode(facts.target),
        )

    def gap(self, reason: str, count: int | None, root: int = 0) -> Event:
        """A `gap`: `dest_path` names the cause, `size` how many changes (when known) lost their history,
        `root` the watch root it concerns (the first when it concerns them all)."""
        ident = self._identity
        log.warning("gap_recorded", reason=reason, changes=count)
        return Event(
            uuid7(),
            self._next_seq(),
            now_rfc3339(),
            ident.tenant_id,
            ident.user_id,
            ident.session_id,
            ident.pod,
            "gap",
            "",
            reason,
            self._root_names[root],
            "dir",
            count,
            None,
            None,
            None,
            "live",
        )
