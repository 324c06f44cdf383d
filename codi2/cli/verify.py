"""`codi2 verify`: the trail checked against its hash chains, and optionally a disk against the trail."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from codi2.cli.common import DIRECTORY, EXIT_FAILURE, EXIT_OK, FILE, UsageError, completes, config_arg, load
from codi2.cli.events import since

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers
    from codi2.trail.chain import ChainKey


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
        "--since", metavar="ISO8601", help="check each stream from its first batch journaled at or after this time"
    )
    key_file = verify.add_argument(
        "--key-file",
        type=Path,
        action="append",
        metavar="FILE",
        help="an HMAC key the trail is sealed with; repeat it for every key still in the trail (default: "
        "[integrity] key_file)",
    )
    completes(key_file, FILE)
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
    verify.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from codi2.stores.base import open_sink
    from codi2.trail import verify
    from codi2.trail.chain import load_key

    settings = load(args, tenant_id=args.tenant_id, user_id=args.user_id)
    if not settings.tenant_id:
        raise UsageError("tenant_id required (set --tenant-id or $TENANT_ID)")
    start = since(args)
    configured = settings.integrity.key_file
    keys: list[ChainKey] = []
    for path in args.key_file or ([configured] if configured else []):
        try:
            keys.append(load_key(path))
        except ValueError as exc:
            raise UsageError(f"{'--key-file' if args.key_file else 'integrity.key_file'}: {exc}") from None
    sink = open_sink(settings, create=False)
    try:
        report = verify.verify(sink, settings.tenant_id, keys, start)
        if args.disk is not None:
            report.disk = verify.compare_disk(sink, settings, args.disk)
    except verify.VerifyError as exc:
        raise UsageError(str(exc)) from None
    finally:
        sink.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else verify.render(report))
    return EXIT_OK if report.ok else EXIT_FAILURE
