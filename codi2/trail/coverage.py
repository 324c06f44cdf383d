"""What a stream's trail vouches for: the time ranges a daemon was watching (issue 24), so a reader can
tell "nothing changed" from "nobody was watching".

A range opens at a run's `start` record (phase `watching`) and closes at its `stop`; a run that ended
without one (killed) closes, `unclean`, at its last event before the next `start`. A `gap` breaks a range:
what came before it is incomplete, so the range before closes at its last event before the gap and the
next opens at the gap. Events with no `start` before them (a trail older than the records, or read from
`--since`) open a range whose beginning is `unknown`. Fed one event at a time, in commit order, so a
verify of a long trail holds only the ranges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from codi2.trail.events import LIFECYCLE, Event


@dataclass
class Range:
    """From `start` to `end` (RFC 3339), the trail says every change of the stream's workspace.
    `began`: `start` (a run's record), `gap:<cause>`, or `unknown`; `ended`: `stop`, `unclean`,
    `gap:<cause>`, or `open` (the run is still going, or its end is not in the trail yet)."""

    start: str
    end: str
    began: str
    ended: str = "open"


def detail_of(event: Event) -> dict[str, Any]:
    """A lifecycle record's details (`dest_path`, a JSON object); {} for any other event, or bad JSON."""
    if event.action not in LIFECYCLE or not event.dest_path:
        return {}
    try:
        value = json.loads(event.dest_path)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class Coverage:
    """The ranges of one stream, from its events in commit order."""

    def __init__(self) -> None:
        self._closed: list[Range] = []
        self._open: Range | None = None

    def feed(self, e: Event) -> None:
        current = self._open
        if e.action == "start" and detail_of(e).get("phase", "watching") == "watching":
            self._close("unclean")
            self._open = Range(e.ts, e.ts, "start")
        elif e.action == "stop":
            if current is None:
                self._open = Range(e.ts, e.ts, "unknown")
            self._close("stop", e.ts)
        elif e.action == "gap":
            cause = f"gap:{e.dest_path or 'unknown'}"
            self._close(cause)
            self._open = Range(e.ts, e.ts, cause)
        elif current is None:
            self._open = Range(e.ts, e.ts, "unknown")
        else:
            current.end = max(current.end, e.ts)

    def _close(self, how: str, at: str | None = None) -> None:
        if self._open is None:
            return
        if at is not None:
            self._open.end = max(self._open.end, at)
        self._open.ended = how
        self._closed.append(self._open)
        self._open = None

    def ranges(self) -> list[Range]:
        return self._closed + ([self._open] if self._open is not None else [])
