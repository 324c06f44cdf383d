"""`codi2 delete-tenant`: offboarding, everything stored for a tenant removed (docs/retention.md)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from codi2.cli.common import EXIT_FAILURE, EXIT_OK, UsageError, config_arg, load, tenant
from codi2.cli.prune import Refused, store_lock

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    delete = sub.add_parser(
        "delete-tenant",
        help="remove everything stored for a tenant, for good",
        description="Remove the tenant's whole trail from the configured store (every layout), horizons "
        "included. Nothing is archived: run `codi2 archive` first if the trail must be kept.",
    )
    config_arg(delete)
    delete.add_argument("--tenant-id", required=True, help="the tenant to delete")
    delete.add_argument("--yes", action="store_true", help="confirm: without it nothing is deleted")
    delete.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from codi2.stores.open import open_sink

    settings = load(args, tenant_id=args.tenant_id)
    tenant_id = tenant(settings)
    if not args.yes:
        raise UsageError(f"delete-tenant removes every event of tenant {tenant_id} for good: add --yes to do it")
    try:
        with store_lock(settings):
            sink = open_sink(settings, create=False)
            try:
                sink.delete_tenant(tenant_id)
            finally:
                sink.close()
    except Refused as exc:
        print(f"codi2: {exc}")
        return EXIT_FAILURE
    print(f"tenant {tenant_id}: deleted")
    return EXIT_OK
