"""`codi2` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.

The top parser, errors and dispatch; each command is a module that registers its own parser and the
function it runs (`func`), importing what it needs when it runs, so no command pays for another's imports.

`codi2 --config PATH --user-id U --tenant-id T` with no subcommand means `run`: that is how the
workspace pod template calls it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence

from codi2 import __version__
from codi2.cli import archive, completion, config_cmd, delete_tenant, events, prune, run, status, test_cmd, verify
from codi2.cli.common import EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Command, Parser, UsageError
from codi2.config import ConfigError
from codi2.provisioning import cli as provision

COMMANDS = (
    run,
    events,
    verify,
    status,
    archive,
    prune,
    delete_tenant,
    test_cmd,
    provision,
    config_cmd,
    completion,
)  # in the order --help lists them


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
    parser.set_defaults(root_parser=parser)  # `codi2 completion` walks the whole parser
    return parser


def _normalise(argv: Sequence[str], commands: Sequence[str]) -> list[str]:
    """No subcommand means `run`, as the pod template calls it (its first argument is an option); a first
    word that is no command is a mistyped one, not an argument of `run`."""
    args = list(argv)
    if args and not args[0].startswith("-") and args[0] not in commands:
        raise UsageError(_unknown_command(args[0], commands))
    if not args or (args[0] not in commands and args[0] not in ("-h", "--help", "--version")):
        return ["run", *args]
    return args


def _unknown_command(word: str, commands: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, commands, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown command {word!r}{guess}; commands: {', '.join(commands)} (codi2 --help)"


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """The names `_normalise` knows, read from the parser: no list of them to drift from the registrations."""
    return [
        name for action in parser._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        words = _normalise(sys.argv[1:] if argv is None else argv, _subcommands(parser))
    except UsageError as exc:
        print(f"codi2: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(words)
    func: Command = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
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


def _reader_gone() -> int:
    """The reader of stdout went away (`codi2 events | head -1`): quiet, as a tool killed by SIGPIPE is. Python
    ignores SIGPIPE, so stdout is pointed at /dev/null lest the interpreter's last flush fail again at exit
    (the Python docs' note on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE
