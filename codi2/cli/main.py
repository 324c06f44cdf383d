"""`codi2` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.

The top parser, errors and dispatch; each command is a module that registers its own parser and the
function it runs (`func`), importing what it needs when it runs, so no command pays for another's imports.
Only the command that runs has its module imported (`--help` imports them all): the daemon, in every pod,
holds none of the other commands' code.

`codi2 --config PATH --user-id U --tenant-id T` with no subcommand means `run`: that is how the
workspace pod template calls it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Sequence

from codi2 import __version__
from codi2.cli.common import EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Command, Parser, UsageError
from codi2.config import ConfigError

COMMANDS = {
    "run": "codi2.cli.run",
    "events": "codi2.cli.events",
    "verify": "codi2.cli.verify",
    "status": "codi2.cli.status",
    "archive": "codi2.cli.archive",
    "prune": "codi2.cli.prune",
    "delete-tenant": "codi2.cli.delete_tenant",
    "test": "codi2.cli.test_cmd",
    "provision": "codi2.provisioning.cli",
    "config": "codi2.cli.config_cmd",
    "completion": "codi2.cli.completion",
}  # each command and the module that registers it, in the order --help lists them


def build_parser(commands: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """The parser with these commands (all of them by default), importing only their modules."""
    parser = Parser(
        prog="codi2",
        description="Workspace audit daemon: every file change under the watch paths becomes an audit event.",
        epilog="With no subcommand, `codi2 [--config PATH] [--user-id U] [--tenant-id T]` runs the daemon.",
    )
    parser.add_argument("--version", action="version", version=f"codi2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in commands:
        importlib.import_module(COMMANDS[command]).register(sub)
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
    import difflib  # only for a mistyped command: the daemon never needs it

    close = difflib.get_close_matches(word, commands, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown command {word!r}{guess}; commands: {', '.join(commands)} (codi2 --help)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        words = _normalise(sys.argv[1:] if argv is None else argv, list(COMMANDS))
    except UsageError as exc:
        print(f"codi2: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # A command's arguments are parsed by its own parser alone: the others are needed only to list them.
    args = build_parser(words[:1] if words[0] in COMMANDS else COMMANDS).parse_args(words)
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
