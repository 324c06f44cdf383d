"""`codi2 archive`: what a prune before a cutoff would remove, written to self-describing files first; and
`codi2 verify --archive`, which checks such files alone (docs/retention.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from codi2.cli.common import (
    DIRECTORY,
    EXIT_FAILURE,
    EXIT_OK,
    UsageError,
    chain_keys,
    completes,
    config_arg,
    cutoff,
    cutoff_arg,
    key_file_arg,
    load,
    tenant,
)

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers
    from codi2.trail.chain import ChainKey


def register(sub: Subparsers) -> None:
    archive = sub.add_parser(
        "archive",
        help="write every batch committed before a cutoff to verifiable files (before `codi2 prune`)",
        description="Write each stream's batches that `codi2 prune` with the same cutoff removes (headers and the "
        "exact records their links cover), and the events in no batch, to DIR with a manifest; then check the "
        "archive as `codi2 verify --archive DIR` does. Exit 0 when it is intact, 1 otherwise.",
    )
    config_arg(archive)
    archive.add_argument("--tenant-id", help="tenant to archive (default: the configured identity, $TENANT_ID)")
    cutoff_arg(archive)
    out = archive.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new or empty directory")
    completes(out, DIRECTORY)
    key_file_arg(archive)
    archive.add_argument("--json", action="store_true", help="print the archive's check as one JSON document")
    archive.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from codi2.stores.open import open_sink
    from codi2.trail import archive

    settings = load(args, tenant_id=args.tenant_id)
    tenant_id, before, keys = tenant(settings), cutoff(args, settings), chain_keys(args, settings)
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: not an empty directory (an archive is never written over)")
    sink = open_sink(settings, create=False)
    try:
        archive.write(sink, sink.retention_plan(tenant_id, before), out)
    finally:
        sink.close()
    return check(out, keys, as_json=args.json)


def check(path: Path, keys: list[ChainKey], *, as_json: bool) -> int:
    """`codi2 verify --archive DIR`, and the check after writing one."""
    from codi2.trail import archive

    report = archive.verify_archive(path, keys)
    print(json.dumps(report.to_dict(), indent=2) if as_json else archive.render(report))
    return EXIT_OK if report.ok else EXIT_FAILURE
