"""Events as the pipeline records them: this daemon's identity, the journal's next sequence number and the
time of the observation, around what the reconciler found. One place, so the reconciler's events and the
pipeline's own `gap` events cannot disagree on any of it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from codi2.disk.fs import O_FILE, Facts, open_dir, split
from codi2.trail.events import Action, Event, Identity, Origin, now_rfc3339, rfc3339_ns, uuid7

log = structlog.get_logger("codi2.pipeline.factory")


SESSION_MAX_BYTES = 1024  # what is read of a session file: an id, not a document


class SessionFile:
    """The IDE's current session id, in a file it rewrites: read again only when its stat changes (inode,
    size, mtime, ctime), so checking it at every batch cut costs one stat. Missing, unreadable, empty or not
    a regular file: `fallback`, the daemon's fixed session.

    The file is usually in the workspace, where the user may replace it: below a watch root it is reached
    through directory descriptors that follow no symlink (a link to the Secret's cluster file would put it
    in every event), and opened without blocking (a FIFO would hold the journal thread in open())."""

    def __init__(self, path: Path, fallback: str | None, roots: Sequence[Path] = ()) -> None:
        self._path = Path(os.path.abspath(path))
        self._fallback = fallback
        self._seen: tuple[int, int, int, int] | None = None
        self._current = fallback
        root = next((r for r in roots if self._path.is_relative_to(r) and self._path != r), None)
        self._beneath = None if root is None else (root, os.fsencode(self._path.relative_to(root)))

    def current(self) -> str | None:
        try:
            st = os.stat(self._path, follow_symlinks=False)
        except OSError:
            self._seen, self._current = None, self._fallback
            return self._current
        seen = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if seen != self._seen:
            text = self._read()
            if text != (self._current or ""):
                log.info("session_changed", session_id=text or self._fallback)
            self._seen, self._current = seen, text or self._fallback
        return self._current

    def _read(self) -> str:
        """The file's first bytes as text, or "" when it is not a regular file reached without a symlink."""
        try:
            fd = self._open()
        except OSError:
            return ""
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ""
            return os.read(fd, SESSION_MAX_BYTES).decode(errors="replace").strip()
        except OSError:
            return ""
        finally:
            os.close(fd)

    def _open(self) -> int:
        if self._beneath is None:
            return os.open(self._path, O_FILE)
        root, rel = self._beneath
        parent, name = split(rel)
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            dir_fd = open_dir(root_fd, parent)
        finally:
            os.close(root_fd)
        try:
            return os.open(name, O_FILE, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


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
        log.warning("gap_recorded", reason=reason, changes=count)
        return self.pathless("gap", root, os.fsencode(reason), count)

    def pathless(self, action: Action, root: int, detail: bytes, size: int | None, sha256: str | None = None) -> Event:
        """A record of the daemon's own (a `gap`, a lifecycle record): built as every event is, with an empty
        path, `detail` in `dest_path`, and only `size` and `sha256` of a bare `dir`'s facts, so that both
        kinds are shaped alike."""
        facts = Facts("dir", size, None, None, None, None, None, None, sha256)
        return self.observed(action, root, b"", detail, facts, "live")
