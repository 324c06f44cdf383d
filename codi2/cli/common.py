"""What every command's parser shares: exit codes, the usage error, the parser class, `--config`, and the
options and checks several commands take alike (tenant, keys, cutoff, times).

Imported by every command module and by provisioning's parser, so it imports nothing of the data path: what
the shared checks need of it (the key loader, the time parser) is imported inside them.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeAlias

from codi2.config import Settings, load_settings

if TYPE_CHECKING:
    from codi2.trail.chain import ChainKey

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE: the reader stopped reading
FILE, DIRECTORY = "file", "directory"  # what an option's value completes with (shtab, in `codi2 completion`)

Command = Callable[[argparse.Namespace], int]  # what a leaf parser's `func` default is: its exit code
RELATIVE = re.compile(r"(\d+)([smhdw])")  # `--since 30m`: that long before now
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


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


def cutoff_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--before",
        metavar="ISO8601",
        help="the cutoff (UTC if no zone; default: now less [retention] max_age)",
    )


def key_file_arg(
    parser: argparse.ArgumentParser,
    help: str = "an HMAC key the trail is sealed with; repeat it for every key (default: [integrity] key_file)",
) -> None:
    key_file = parser.add_argument("--key-file", type=Path, action="append", metavar="FILE", help=help)
    completes(key_file, FILE)


def cutoff(args: argparse.Namespace, settings: Settings) -> datetime:
    """`--before`, else now less `[retention] max_age`: the CronJob's cutoff comes from the config."""
    from codi2.trail.events import parse_time

    if args.before:
        try:
            return parse_time(args.before)
        except ValueError:
            raise UsageError(f"--before: not an ISO 8601 time: {args.before!r}") from None
    max_age = settings.retention.max_age_s
    if max_age is None:
        raise UsageError("--before required (or set [retention] max_age)")
    return datetime.fromtimestamp(time.time() - max_age, UTC)


def tenant(settings: Settings) -> str:
    if not settings.tenant_id:
        raise UsageError("tenant_id required (set --tenant-id or $TENANT_ID)")
    return settings.tenant_id


def chain_keys(args: argparse.Namespace, settings: Settings) -> list[ChainKey]:
    from codi2.trail.chain import load_key

    configured = settings.integrity.key_file
    keys = []
    for path in args.key_file or ([configured] if configured else []):
        try:
            keys.append(load_key(path))
        except ValueError as exc:
            raise UsageError(f"{'--key-file' if args.key_file else 'integrity.key_file'}: {exc}") from None
    return keys


def since(args: argparse.Namespace) -> datetime | None:
    """`--since` as a time (`events` and `verify` take it alike): ISO 8601, or a span back from now."""
    return time_arg(args.since, "--since")


def time_arg(text: str | None, flag: str) -> datetime | None:
    """A time option's value (`--since`, `--until`): ISO 8601, or a span back from now (30m, 1h, 2d)."""
    from codi2.trail.events import parse_time

    if not text:
        return None
    if relative := RELATIVE.fullmatch(text.strip()):
        amount, unit = relative.groups()
        try:
            return datetime.now(UTC) - timedelta(**{UNITS[unit]: int(amount)})
        except (OverflowError, ValueError):  # timedelta's bound, or a time before year 1
            raise UsageError(f"{flag}: {text!r} reaches back before any date") from None
    try:
        return parse_time(text)
    except ValueError:
        raise UsageError(f"{flag}: neither an ISO 8601 time nor a span such as 30m, 1h, 2d: {text!r}") from None
