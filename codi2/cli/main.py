"""`codi2` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.

The top parser, errors and dispatch; each command is a module that registers its own parser and the
function it runs (`func`), importing what it needs when it runs, so no command pays for another's imports.

`codi2 --config PATH --user-id U --tenant-id T` with no subcommand means `run`: that is how the
workspace pod template calls it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from codi2 import __version__
from codi2.cli import completion, config_cmd, events, run, test_cmd, verify
from codi2.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Command, Parser, UsageError
from codi2.config import ConfigError
from codi2.provisioning import cli as provision

COMMANDS = (run, events, verify, test_cmd, provision, config_cmd, completion)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="codi2",
        description="Workspace audit daemon: every file change under the watch paths becomes an audit event.",
        epilog="With no subcommand, `codi2 [--config PATH] [--user-id U] [--tenant-id T]` runs the daemon.",
    )
    parser.add_argument("--version", action="version", version=f"codi2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _normalise(argv: Sequence[str], commands: Sequence[str]) -> list[str]:
    """No subcommand means `run`, as the pod template calls it."""
    args = list(argv)
    if not args or (args[0] not in commands and args[0] not in ("-h", "--help", "--version")):
        return ["run", *args]
    return args


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """The names `_normalise` knows, read from the parser: no list of them to drift from the registrations."""
    return [
        name for action in parser._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalise(sys.argv[1:] if argv is None else argv, _subcommands(parser)))
    func: Command = args.func
    try:
        return func(args)
    except (ConfigError, UsageError) as exc:
        print(f"codi2: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        if getattr(args, "debug", False):  # `completion` and `config reference` have no --debug
            raise
        print(f"codi2: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
