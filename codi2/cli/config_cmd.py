"""`codi2 config check` (the effective settings as JSON) and `codi2 config reference` (docs/config.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from codi2.cli.common import EXIT_OK, Parser, config_arg, load

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    config = sub.add_parser("config", help="configuration tools", description="Configuration tools.")
    config_sub = config.add_subparsers(dest="config_command", metavar="COMMAND", parser_class=Parser, required=True)
    check = config_sub.add_parser(
        "check",
        help="validate the config and print it as the daemon would use it",
        description="Validate the config (file, env, flags) and print the effective settings as JSON.",
    )
    config_arg(check)
    check.set_defaults(func=check_command)
    reference = config_sub.add_parser(
        "reference",
        help="print every key as Markdown (docs/config.md)",
        description="Print every config key with its type, default, environment variable and description.",
    )
    reference.set_defaults(func=reference_command)


def check_command(args: argparse.Namespace) -> int:
    settings = load(args)
    for note in settings.ignored_keys():
        print(f"codi2: warning: {note}", file=sys.stderr)
    print(json.dumps(settings.effective(), indent=2))
    return EXIT_OK


def reference_command(args: argparse.Namespace) -> int:
    from codi2.cli.config_reference import render

    print(render(), end="")
    return EXIT_OK
