"""`codi2 events`: the trail read back in commit order, as JSON lines or a table, or the workspace state it
implies (`--replay`); `--follow` keeps printing."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, get_args

from codi2.cli.common import EXIT_OK, FILE, UsageError, completes, config_arg, load, printable, since, tenant, time_arg
from codi2.trail.events import ACTIONS, Event, EventQuery, Origin
from codi2.trail.export import FORMATS, render

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers
    from codi2.cli.cursor import CursorFile
    from codi2.config import Settings
    from codi2.stores.base import TrailReader

FOLLOW_POLL_S = 0.5
TABLE = "{ts:<27} {action:<7} {type:<7} {size:>10} {mode:>4} {origin:<8} {user:<12} {session:<12} {owner:<9} {path}"
REPLAY_TABLE = "{type:<7} {sha256:<64} {root}  {path}"


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
    events.add_argument("--origin", choices=get_args(Origin), help="only events of this origin")
    events.add_argument("--user", metavar="USER_ID", help="only events of this user")
    events.add_argument("--session", metavar="S", help="only events of this IDE session")
    events.add_argument(
        "--since",
        metavar="TIME",
        help="only events at or after this time: ISO 8601 (UTC if no zone), or that long ago (30s, 15m, 1h, 2d, 1w)",
    )
    events.add_argument(
        "--until",
        metavar="TIME",
        help="only events at or before this time: ISO 8601 (UTC if no zone), or that long ago (30s, 15m, 1h, 2d, 1w)",
    )
    events.add_argument(
        "--after-seq", type=int, metavar="N", help="only events whose seq (the journal's sequence) is above N"
    )
    events.add_argument("--limit", type=int, metavar="N", help="print at most N events")
    events.add_argument("--follow", action="store_true", help="keep printing new events until interrupted")
    cursor_file = events.add_argument(
        "--cursor-file",
        type=Path,
        metavar="F",
        help="resume after the last event a run with this file printed, and record each one there once its line is"
        " flushed (docs/siem.md)",
    )
    completes(cursor_file, FILE)
    events.add_argument(
        "--replay",
        action="store_true",
        help="print the workspace state the trail implies (fold of the selected events), one entry per line",
    )
    events.add_argument(
        "--format",
        choices=("jsonl", "table", *FORMATS),
        help="jsonl (default when stdout is not a terminal), table (default on a terminal), or for a SIEM: ocsf"
        " (OCSF 1.5.0 File System Activity) or ecs (Elastic Common Schema 9.4.0)",
    )
    events.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from codi2.stores.open import open_sink

    settings = load(args, tenant_id=args.tenant_id)
    tenant_id = tenant(settings)
    if args.limit is not None and args.limit < 0:
        raise UsageError("--limit: must be 0 or more")
    if args.replay and (args.cursor_file or args.format in FORMATS):
        raise UsageError("--replay prints workspace entries, not events: not with --cursor-file, ocsf or ecs")
    wanted = _filter(args)
    # The store applies its own filters and the limit; the limit moves here when this command filters too.
    limit = args.limit if wanted is None else None
    query = EventQuery(
        tenant_id,
        args.path,
        args.action,
        since(args),
        limit,
        until=time_arg(args.until, "--until"),
        session_id=args.session,
    )
    fmt = args.format or ("table" if sys.stdout.isatty() else "jsonl")
    if fmt == "table":  # a name no encoding of the terminal can show is escaped, never a crash
        _reconfigure(sys.stdout)
    if args.limit == 0 and not args.replay:
        return EXIT_OK
    sink = open_sink(settings, create=False)
    if args.replay:
        try:
            rows = sink.read(query)
            selected = (e for _, e in rows if wanted is None or wanted(e))
            return _replay(itertools.islice(selected, args.limit), fmt, tenant_id)
        finally:
            sink.close()
    printed = 0
    cursor_file = None
    try:
        cursor_file = _cursor_file(args.cursor_file, settings, query.tenant_id, sink)
        after = cursor_file.load() if cursor_file is not None else None
        while True:
            for cursor, event in sink.read(query, after=after):
                after = cursor  # --follow resumes after the last event printed
                if wanted is not None and not wanted(event):
                    continue
                if fmt == "jsonl":
                    print(event.to_json())
                elif fmt in FORMATS:
                    print(render(fmt, event))
                else:
                    print(_table_row(event.to_dict(), header=printed == 0))
                if cursor_file is not None:  # the line first, then the cursor: a crash between reprints it
                    sys.stdout.flush()
                    cursor_file.save(cursor, event.id)
                printed += 1
                if args.limit is not None and printed >= args.limit:
                    return EXIT_OK
            if not args.follow:
                if printed == 0:
                    _nothing("no events match", tenant_id)
                return EXIT_OK
            sys.stdout.flush()
            time.sleep(FOLLOW_POLL_S)
    finally:
        if cursor_file is not None:
            cursor_file.close()
        sink.close()


def _cursor_file(path: Path | None, settings: Settings, tenant_id: str, sink: TrailReader) -> CursorFile | None:
    from codi2.cli.cursor import CursorFile, store_name

    return CursorFile(path, tenant_id, store_name(settings), sink) if path is not None else None


def _filter(args: argparse.Namespace) -> Callable[[Event], bool] | None:
    """The filters this command applies itself, on each event the store returns; None when there are none."""
    tests: list[Callable[[Event], bool]] = []
    if args.origin is not None:
        tests.append(lambda e: e.origin == args.origin)
    if args.user is not None:
        tests.append(lambda e: e.user_id == args.user)
    if args.after_seq is not None:
        tests.append(lambda e: e.seq > args.after_seq)
    if not tests:
        return None
    return lambda e: all(test(e) for test in tests)


def _nothing(message: str, tenant: str) -> None:
    """Said on a terminal only: to a script an empty output is the answer."""
    if sys.stdout.isatty():
        print(f"codi2: {message} (tenant {tenant}; see the filters in codi2 events --help)", file=sys.stderr)


def _reconfigure(stream: TextIO) -> None:
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="backslashreplace")


def _replay(events: Iterator[Event], fmt: str, tenant: str) -> int:
    from codi2.trail.replay import fold

    state = fold(events)
    if fmt == "table" and state:
        print(REPLAY_TABLE.format(type="TYPE", sha256="SHA256", root="ROOT", path="PATH"))
    for (root, path), entry in sorted(state.items()):
        if fmt == "jsonl":
            line = {"root": root, "path": path, **asdict(entry)}
            print(json.dumps(line, separators=(",", ":")))
        else:
            fields = {"type": entry.type, "sha256": entry.sha256 or "-", "root": printable(root)}
            print(REPLAY_TABLE.format(path=printable(path), **fields))
    if not state:
        _nothing("no entries: the selected events leave no file", tenant)
    return EXIT_OK


def _table_row(e: dict[str, Any], *, header: bool) -> str:
    path = printable(e["path"])
    if e["dest_path"] is not None:
        path += f" -> {printable(e['dest_path'])}"
    uid, gid = e["uid"], e["gid"]
    row = TABLE.format(
        ts=e["ts"],
        action=e["action"],
        type=e["type"],
        size="-" if e["size"] is None else e["size"],
        mode="-" if e["mode"] is None else f"{e['mode']:04o}",
        origin=e["origin"],
        user=printable(e["user_id"]),
        session=printable(e["session_id"] or "-"),
        owner="-" if uid is None else f"{uid}:{gid}",
        path=path,
    )
    if header:
        titles = TABLE.format(
            ts="TS",
            action="ACTION",
            type="TYPE",
            size="SIZE",
            mode="MODE",
            origin="ORIGIN",
            user="USER",
            session="SESSION",
            owner="OWNER",
            path="PATH",
        )
        return f"{titles}\n{row}"
    return row
