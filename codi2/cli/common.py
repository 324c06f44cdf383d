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
