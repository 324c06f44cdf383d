"""The daemon's own life in the trail (issue 24), as auditd's DAEMON_START/DAEMON_END: so a reader can
tell "nothing changed" from "nobody was watching".

Three records, all events of their own actions (`start`, `stop`; docs/trail-format.md), so they sit in
the hash chain like every change and a store cannot drop one unseen. Not `gap`s: a start is not lost
history, and a gap raises the trail-gap alert, which a rollout must not. Their details are a JSON object
in `dest_path` (the trail's record keeps its version; every release reads them):

- `start` (phase `watching`), at the head of a run's first batch: version, backend, roots, the digest of
  the effective config, and how the run before it ended: `clean` (its `stop` is in the trail), `unclean`
  (none: killed, or died), `none` (the journal's first run), `unknown` (a journal older than these records);
- `start` (phase `scanned`), once the start-up diff is committed: what it found (entries, changes);
- `stop`, the last batch of a run: clean or not, changes not journaled, events left in the spool.

The journal's `lifecycle` flag, set in the transaction of each record, is how the next start knows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from codi2.pipeline.factory import EventFactory
from codi2.trail.events import Event, Origin

RUNNING, STOPPED = "running", "stopped"
_PREVIOUS = {RUNNING: "unclean", STOPPED: "clean"}


@dataclass(frozen=True)
class Mark:
    """A lifecycle record waiting for the head of the next batch; `state`, when set, is the journal's
    lifecycle flag its transaction writes."""

    action: Literal["start", "stop"]
    detail: dict[str, Any]
    count: int | None = None
    sha256: str | None = None
    state: str | None = None


def config_digest(effective: dict[str, Any]) -> str:
    """SHA-256 of the effective config as canonical JSON: two runs with one digest ran one config."""
    return hashlib.sha256(json.dumps(effective, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def start_mark(
    *, version: str, backend: str, roots: list[str], config_sha256: str, previous: str | None, history: bool
) -> Mark:
    """`previous` is the journal's lifecycle flag as the run before left it; without one, a journal with
    `history` (batches) was written by a release before these records, or recovered into a new file."""
    detail = {
        "phase": "watching",
        "version": version,
        "backend": backend,
        "roots": roots,
        "config_sha256": config_sha256,
        "previous_run": _PREVIOUS.get(previous or "", "unknown" if history else "none"),
    }
    return Mark("start", detail, sha256=config_sha256, state=RUNNING)


def scanned_mark(origin: Origin, entries: int, changes: int) -> Mark:
    """The start-up diff committed: `entries` in the index, `changes` it recorded (`origin` says whether
    they are a first baseline or what changed while nobody watched)."""
    return Mark("start", {"phase": "scanned", "origin": origin, "entries": entries, "changes": changes}, count=changes)


def stop_mark(*, not_journaled: int, spool_events: int) -> Mark:
    detail = {"clean": not_journaled == 0, "changes_not_journaled": not_journaled, "spool_events": spool_events}
    return Mark("stop", detail, count=spool_events, state=STOPPED)


def mark_event(factory: EventFactory, mark: Mark) -> Event:
    """The record, built as every event is (identity, sequence, time): at the first root, path empty."""
    detail = json.dumps(mark.detail, sort_keys=True, separators=(",", ":")).encode()
    return factory.pathless(mark.action, 0, detail, mark.count, mark.sha256)
