"""`codi2 prune`: each stream's batches before a cutoff removed, its horizon written first, so `codi2 verify`
still proves what is left whole (docs/retention.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
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
    cutoff,
    cutoff_arg,
    key_file_arg,
    load,
    tenant,
)

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers
    from codi2.config import Settings
    from codi2.stores.base import RetentionPlan


class Refused(Exception):
    """The store cannot be changed now, or not as asked: one line, exit 1."""


def register(sub: Subparsers) -> None:
    prune = sub.add_parser(
        "prune",
        help="remove each stream's batches committed before a cutoff, leaving a horizon verify checks against",
        description="Per stream, the last batch wholly before the cutoff becomes its horizon (written first); then "
        "everything committed before it is removed in bounded transactions. `codi2 verify` then checks that each "
        "stream's first live batch follows its horizon. With --archive, the cutoff is the archive's, and the "
        "prune is refused unless it removes exactly what the archive holds. With SQLite it is refused while a "
        "daemon runs on the file (the daemon applies [retention] max_age itself).",
    )
    config_arg(prune)
    prune.add_argument("--tenant-id", help="tenant to prune (default: the configured identity, $TENANT_ID)")
    cutoff_arg(prune)
    archive = prune.add_argument(
        "--archive", type=Path, metavar="DIR", help="remove what this archive (`codi2 archive`) holds, no more"
    )
    completes(archive, DIRECTORY)
    key_file_arg(prune)
    prune.add_argument("--json", action="store_true", help="print what was pruned as one JSON document")
    prune.set_defaults(func=command)


@contextlib.contextmanager
def store_lock(settings: Settings) -> Iterator[None]:
    """With SQLite, the lock a daemon holds on the file (the journal thread is its one writer): taken for
    the command's length, or the command is refused while a daemon runs."""
    if settings.backend != "sqlite":
        yield
        return
    from codi2.daemon.daemon import StartupError, StateLock

    lock = StateLock(settings.state_dir, file=settings.sqlite_file)
    try:
        lock.acquire()
    except StartupError as exc:
        raise Refused(f"{exc}: it applies [retention] max_age itself; stop it to change the store by hand") from None
    try:
        yield
    finally:
        lock.release()


def command(args: argparse.Namespace) -> int:
    from codi2.stores.open import open_sink
    from codi2.trail import archive

    settings = load(args, tenant_id=args.tenant_id)
    tenant_id = tenant(settings)
    manifest = None
    if args.archive is not None:
        if args.before:
            raise UsageError("--before and --archive: give one (the archive holds its cutoff)")
        report = archive.verify_archive(args.archive, chain_keys(args, settings))
        if not report.ok:
            print(archive.render(report))
            print(f"codi2: --archive {args.archive}: not intact: nothing pruned")
            return EXIT_FAILURE
        manifest = archive.read_manifest(args.archive)
        if manifest["tenant_id"] != tenant_id:
            raise UsageError(f"--archive {args.archive} holds tenant {manifest['tenant_id']}, not {tenant_id}")
        args.before = manifest["before"]
    before = cutoff(args, settings)
    try:
        with store_lock(settings):
            sink = open_sink(settings, create=False)
            try:
                plan = sink.retention_plan(tenant_id, before)
                if manifest is not None:
                    _same_as_archive(plan, manifest)
                sink.prune(plan)
            finally:
                sink.close()
    except Refused as exc:
        print(f"codi2: {exc}")
        return EXIT_FAILURE
    print(json.dumps(summary(plan), indent=2) if args.json else render(plan))
    return EXIT_OK


def _same_as_archive(plan: RetentionPlan, manifest: dict[str, Any]) -> None:
    archived = {s["stream_id"]: s for s in manifest["streams"]}
    for stream, p in plan.streams.items():
        a = archived.pop(stream, None)
        after = None if p.previous is None else {"number": p.previous.number, "link": p.previous.link.hex()}
        if (
            a is None
            or a["after"] != after
            or (a["last"]["number"], a["last"]["link"]) != (p.horizon.number, p.horizon.link.hex())
        ):
            raise Refused(f"stream {stream}: the store changed since the archive was written: archive again")
    if archived:
        raise Refused(f"stream {next(iter(archived))}: archived, but the store has no such batches to prune now")


def summary(plan: RetentionPlan) -> dict[str, Any]:
    return {
        "tenant_id": plan.tenant_id,
        "before": plan.before.isoformat(),
        "streams": {
            stream: {
                "horizon": p.horizon.number,
                "link": p.horizon.link.hex(),
                "batches": p.batches,
                "events": p.events,
            }
            for stream, p in sorted(plan.streams.items())
        },
        "batches": sum(p.batches for p in plan.streams.values()),
        "events": sum(p.events for p in plan.streams.values()),
        "legacy_layout": plan.legacy,
    }


def render(plan: RetentionPlan) -> str:
    s = summary(plan)
    lines = [
        f"stream {k}: pruned through batch {v['horizon']} ({v['batches']} batches)" for k, v in s["streams"].items()
    ]
    lines.append(f"tenant {plan.tenant_id}: pruned {s['batches']} batches, {s['events']} events before {s['before']}")
    return "\n".join(lines)
