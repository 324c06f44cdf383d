"""`codi2 verify`: the trail checked against its hash chains, and optionally a disk against the trail."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codi2.cli.common import (
    DIRECTORY,
    EXIT_FAILURE,
    EXIT_OK,
    UsageError,
    chain_keys,
    completes,
    config_arg,
    key_file_arg,
    load,
    printable,
    since,
    tenant,
)

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers
    from codi2.trail.verify import Report

LIVE_HINT = "a change made in the last few seconds may not be committed yet: run again"


def register(sub: Subparsers) -> None:
    verify = sub.add_parser(
        "verify",
        help="check the trail's hash chains: nothing removed, altered, reordered or inserted",
        description="Walk every stream of the tenant's trail and check each batch's link; print per stream its "
        "batches, events, first and last time, head and every break. Exit 0 when the trail is intact, 1 "
        "otherwise (docs/trail-format.md).",
    )
    config_arg(verify)
    verify.add_argument("--tenant-id", help="tenant to check (default: the configured identity, $TENANT_ID)")
    verify.add_argument(
        "--since",
        metavar="TIME",
        help="check each stream from its first batch journaled at or after this time (ISO 8601, or a span back "
        "from now: 30m, 1h, 2d)",
    )
    key_file_arg(
        verify,
        help="an HMAC key the trail is sealed with; repeat it for every key still in the trail (default: "
        "[integrity] key_file)",
    )
    verify.add_argument("--json", action="store_true", help="print the report as one JSON document")
    disk = verify.add_argument(
        "--disk",
        type=Path,
        metavar="PATH",
        help="also fold the whole trail and compare it with this workspace (the user's, see --user-id)",
    )
    completes(disk, DIRECTORY)
    verify.add_argument(
        "--user-id", help="whose workspace --disk is (default: the configured identity; needed with several users)"
    )
    archive = verify.add_argument(
        "--archive", type=Path, metavar="DIR", help="check an archive (`codi2 archive`) alone instead of the store"
    )
    completes(archive, DIRECTORY)
    verify.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from codi2.stores.open import open_sink
    from codi2.trail import verify

    settings = load(args, tenant_id=args.tenant_id, user_id=args.user_id)
    if args.archive is not None:
        from codi2.cli.archive import check

        return check(args.archive, chain_keys(args, settings), as_json=args.json)
    tenant_id, start, keys = tenant(settings), since(args), chain_keys(args, settings)
    sink = open_sink(settings, create=False)
    disk_error = None
    try:
        try:
            report = verify.verify(sink, tenant_id, keys, start)
        except verify.VerifyError as exc:
            raise UsageError(str(exc)) from None
        if args.disk is not None:
            try:
                report.disk = verify.compare_disk(sink, settings, args.disk)
            except verify.VerifyError as exc:  # the chain's report stands on its own: printed all the same
                disk_error = str(exc)
            except OSError as exc:
                disk_error = f"--disk {args.disk}: {exc.strerror or exc}"
    finally:
        sink.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    if disk_error is not None:
        raise UsageError(disk_error)
    return EXIT_OK if report.ok else EXIT_FAILURE


def render(report: Report) -> str:
    """The chain's report, then the disk's: each difference as what the trail says against what the disk
    says, what could not be read named as such, and a hint, since on a live workspace a difference may be a
    change the daemon has not committed yet."""
    from codi2.trail import verify

    lines = [verify.render(report)]
    d = report.disk
    if d is None:
        return lines[0]
    differ = f"{len(d.differences)} differ from the trail" if d.differences else "exactly what the trail folds to"
    unread = f"; {d.unreadable} could not be read (not compared)" if d.unreadable else ""
    lines.append(f"disk {d.path} (watch root {d.root}, user {d.user_id or '-'}): {d.entries} entries, {differ}{unread}")
    for x in d.differences:
        trail, disk = _says(x["trail"], x["disk"]), _says(x["disk"], x["trail"])
        lines.append(f"  {printable(x['path'])}: the trail {trail}, the disk {disk}")
    lines += [f"  unreadable: {printable(x['path'])}: {x['problem']}" for x in d.unreadable_listed]
    if d.unreadable > len(d.unreadable_listed):
        lines.append(f"  … and {d.unreadable - len(d.unreadable_listed)} more unreadable")
    if d.differences:
        lines.append(f"hint: {LIVE_HINT}")
    return "\n".join(lines)


def _says(entry: dict[str, Any] | None, other: dict[str, Any] | None) -> str:
    """One side of a difference: the type and hash, a symlink's target, and the owner when the two sides
    know different ones (a chown, or a retargeted link, differs in nothing else)."""
    if entry is None:
        return "has nothing there"
    digest = entry.get("sha256")
    said = f"says {entry['type']}" + (f" sha256 {digest[:12]}…" if digest else "")
    if entry.get("target") is not None:
        said += f" to '{printable(entry['target'])}'"
    owner, theirs = (entry.get("uid"), entry.get("gid")), other and (other.get("uid"), other.get("gid"))
    if None not in owner and theirs and None not in theirs and owner != theirs:
        said += f" owned by {owner[0]}:{owner[1]}"
    return said
