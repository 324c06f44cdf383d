"""`codi2 events`: the trail read back in commit order, as JSON lines or a table, or the workspace state it
implies (`--replay`); `--follow` keeps printing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from codi2.cli.common import EXIT_OK, UsageError, config_arg, load
from codi2.trail.events import ACTIONS, Event, EventQuery, parse_time

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers

FOLLOW_POLL_S = 0.5


def register(sub: Subparsers) -> None:
    events = sub.add_parser(
        "events",
        help="read the audit trail back, oldest first",
        description="Print audit events from the configured store, oldest first.",
    )
    config_arg(events)
    events.add_argument("--tenant-id", help="tenant to read (default: the configured identity, $TENANT_ID)")
    events.add_argument("--path", metavar="GLOB", help="only events whose path or dest_path matches (* spans /)")
    events.add_argument("--action", choices=ACTIONS, help="only events with this action")
    events.add_argument("--since", metavar="ISO8601", help="only events at or after this time (UTC if no zone)")
    events.add_argument("--until", metavar="ISO8601", help="only events at or before this time (UTC if no zone)")
    events.add_argument("--session", metavar="S", help="only events of this IDE session")
    events.add_argument("--limit", type=int, metavar="N", help="print at most N events")
    events.add_argument("--follow", action="store_true", help="keep printing new events until interrupted")
    events.add_argument(
        "--replay",
        action="store_true",
        help="print the workspace state the trail implies (fold of the selected events), one JSON line per entry",
    )
    events.add_argument(
        "--format",
        choices=("jsonl", "table"),
        help="jsonl (default when stdout is not a terminal) or table (default on a terminal)",
    )
    events.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from codi2.stores.base import open_sink

    settings = load(args, tenant_id=args.tenant_id)
    if not settings.tenant_id:
        raise UsageError("tenant_id required (set --tenant-id or $TENANT_ID)")
    if args.limit is not None and args.limit < 0:
        raise UsageError("--limit: must be 0 or more")
    query = EventQuery(
        settings.tenant_id,
        args.path,
        args.action,
        since(args),
        args.limit,
        until=_time(args.until, "--until"),
        session_id=args.session,
    )
    fmt = args.format or ("table" if sys.stdout.isatty() else "jsonl")
    if args.limit == 0 and not args.replay:
        return EXIT_OK
    sink = open_sink(settings, create=False)
    if args.replay:
        try:
            return _replay(sink.read(query))
        finally:
            sink.close()
    printed = 0
    after = None
    try:
        while True:
            for cursor, event in sink.read(query, after=after):
                after = cursor  # --follow resumes after the last event printed
                if fmt == "jsonl":
                    print(event.to_json())
                else:
                    print(_table_row(event.to_dict(), header=printed == 0))
                printed += 1
                if args.limit is not None and printed >= args.limit:
                    return EXIT_OK
            if not args.follow:
                return EXIT_OK
            sys.stdout.flush()
            time.sleep(FOLLOW_POLL_S)
    finally:
        sink.close()


def since(args: argparse.Namespace) -> datetime | None:
    """`--since` as a time (`events` and `verify` take it alike)."""
    return _time(args.since, "--since")


def _time(text: str | None, flag: str) -> datetime | None:
    try:
        return parse_time(text) if text else None
    except ValueError:
        raise UsageError(f"{flag}: not an ISO 8601 time: {text!r}") from None


def _replay(rows: Iterator[tuple[Any, Event]]) -> int:
    from codi2.trail.replay import fold

    state = fold(event for _, event in rows)
    for (root, path), entry in sorted(state.items()):
        print(json.dumps({"root": root, "path": path, "type": entry.type, "sha256": entry.sha256}))
    return EXIT_OK


def _printable(path: str) -> str:
    """Newlines and undecodable bytes shown as escapes, so one event stays one table row."""
    return path.encode("unicode_escape").decode("ascii") if not path.isprintable() else path


def _table_row(e: dict[str, Any], *, header: bool) -> str:
    path = _printable(e["path"])
    if e["dest_path"] is not None:
        path += f" -> {_printable(e['dest_path'])}"
    row = f"{e['ts']:<28} {e['action']:<8} {e['type']:<7} {e['size'] if e['size'] is not None else '-':>10}  {path}"
    if header:
        return f"{'TS':<28} {'ACTION':<8} {'TYPE':<7} {'SIZE':>10}  PATH\n{row}"
    return row
