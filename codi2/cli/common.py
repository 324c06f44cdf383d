"""What every command's parser shares: exit codes, the usage error, the parser class, `--config`.

Imported by every command module and by provisioning's parser, so it imports nothing of the data path.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeAlias

from codi2.config import Settings, load_settings

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE: the reader stopped reading
FILE, DIRECTORY = "file", "directory"  # what an option's value completes with (shtab, in `codi2 completion`)

Command = Callable[[argparse.Namespace], int]  # what a leaf parser's `func` default is: its exit code


class UsageError(Exception):
    """Bad input on the command line: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def completes(action: argparse.Action, kind: str) -> None:
    """Mark what the option's value completes with (FILE, DIRECTORY): argparse has no field for it, and
    `codi2 completion` hands the marks to shtab, which is imported only there."""
    action.complete = kind  # type: ignore[attr-defined]


def config_arg(parser: argparse.ArgumentParser) -> None:
    """`--config` and `--debug`, as every command that loads the settings takes them."""
    config = parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("CODI2_CONFIG"),
        metavar="PATH",
        help="codi2.toml to load (default: $CODI2_CONFIG; without either, built-in defaults and env only)",
    )
    completes(config, FILE)
    parser.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")


def load(args: argparse.Namespace, **cli: str | None) -> Settings:
    """The settings from `--config`, the environment and these flags (highest first: flags)."""
    return load_settings(args.config, **cli)


def printable(path: str) -> str:
    """A name as a person reads it on one line: bytes that are not UTF-8 as \\xNN, control characters such as
    a newline as escapes, so one name stays on one line (a table row, a line of a report)."""
    if path.isprintable():
        return path
    try:
        text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: shown as Python writes it
        return path.encode("unicode_escape").decode("ascii")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
