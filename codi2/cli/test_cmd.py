"""`codi2 test`: the configured store checked step by step (`checks`), each step printed as it ends."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from codi2.cli.common import EXIT_FAILURE, EXIT_OK, config_arg, load

if TYPE_CHECKING:
    from codi2.cli.checks import Step
    from codi2.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    test = sub.add_parser(
        "test",
        help="check the configured store step by step (library, cluster file, reachability, a probe write)",
        description="Check the configured store step by step; exit 0 when every step passes, 1 otherwise.",
    )
    config_arg(test)
    test.add_argument("--tenant-id", help="tenant whose prefix the probe key goes under (default: configured)")
    test.add_argument("--json", action="store_true", help="print the steps as one JSON document")
    test.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from codi2.cli.checks import render, run_checks

    settings = load(args, tenant_id=args.tenant_id)
    steps: list[Step] = []
    for step in run_checks(settings, args.config):
        steps.append(step)
        if not args.json:
            print(render([step], as_json=False), flush=True)
    if args.json:
        print(render(steps, as_json=True))
    return EXIT_OK if all(s.ok for s in steps) else EXIT_FAILURE
