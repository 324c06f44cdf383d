"""Events as the pipeline records them: this daemon's identity, the journal's next sequence number and the
time of the observation, around what the reconciler found. One place, so the reconciler's events and the
pipeline's own `gap` events cannot disagree on any of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import structlog

from codi2.disk.fs import Facts
from codi2.trail.events import Action, Event, Identity, Origin, now_rfc3339, rfc3339_ns, uuid7

log = structlog.get_logger("codi2.pipeline.factory")


SESSION_MAX_BYTES = 1024  # what is read of a session file: an id, not a document


class SessionFile:
    """The IDE's current session id, in a file it rewrites: read again only when its stat changes (inode,
    size, mtime, ctime), so checking it at every batch cut costs one stat. Missing, unreadable or empty:
    `fallback`, the daemon's fixed session."""

    def __init__(self, path: Path, fallback: str | None) -> None:
        self._path = path
        self._fallback = fallback
        self._seen: tuple[int, int, int, int] | None = None
        self._current = fallback

    def current(self) -> str | None:
        try:
            st = os.stat(self._path)
        except OSError:
            self._seen, self._current = None, self._fallback
            return self._current
        seen = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if seen != self._seen:
            try:
                with open(self._path, "rb") as f:
                    text = f.read(SESSION_MAX_BYTES).decode(errors="replace").strip()
            except OSError:
                text = ""
            if text != (self._current or ""):
                log.info("session_changed", session_id=text or self._fallback)
            self._seen, self._current = seen, text or self._fallback
        return self._current


class EventFactory:
    """Builds every event of one daemon. `next_seq` hands out the journal's sequence numbers (taken in
    the transaction that appends the event, so a rolled-back batch gives them back). The session is the
    identity's, or the session file's as `refresh_session` last found it."""

    def __init__(
        self,
        identity: Identity,
        root_names: list[str],
        next_seq: Callable[[], int],
        session_file: SessionFile | None = None,
    ) -> None:
        self._identity = identity
        self._root_names = root_names
        self._next_seq = next_seq
        self._session_file = session_file
        self._session = identity.session_id
        self.refresh_session()

    def refresh_session(self) -> None:
        """At a batch cut: the session the events from now on carry."""
        if self._session_file is not None:
            self._session = self._session_file.current()

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
            self._session,
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
            self._session,
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
