"""`codi2 run`: the daemon in the foreground (the default command: the pod template calls it so).

The daemon's modules are imported when the command runs, not when the parser is built, so every other
command starts without them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from codi2.cli.common import EXIT_FAILURE, UsageError, config_arg, load

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    run = sub.add_parser("run", help="run the daemon (the default)", description="Run the daemon in the foreground.")
    config_arg(run)
    run.add_argument("--user-id", help="user the events belong to (default: $USER_ID)")
    run.add_argument("--tenant-id", help="tenant the events are scoped to (default: $TENANT_ID)")
    run.add_argument("--session-id", help="IDE session id recorded in each event (default: $SESSION_ID)")
    run.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    import structlog

    from codi2.daemon.build import build
    from codi2.daemon.daemon import Daemon, StartupError
    from codi2.logs import configure_logging
    from codi2.trail.events import Identity

    settings = load(args, user_id=args.user_id, tenant_id=args.tenant_id, session_id=args.session_id)
    missing = [name for name in ("tenant_id", "user_id") if not getattr(settings, name)]
    if missing:
        flags = ", ".join(f"--{m.replace('_', '-')} or ${m.upper()}" for m in missing)
        raise UsageError(f"{' and '.join(missing)} required to run (set {flags})")
    identity = Identity(settings.tenant_id or "", settings.user_id or "", settings.session_id, settings.pod)
    bound = {"tenant_id": identity.tenant_id, "user_id": identity.user_id, "pod": identity.pod}
    if identity.session_id is not None:
        bound["session_id"] = identity.session_id
    configure_logging(settings.logging.level, settings.logging.format, bound)
    for note in settings.ignored_keys():
        structlog.get_logger("codi2.cli.run").warning("config_key_ignored", detail=note)
    daemon = Daemon(build(settings, identity))
    try:
        return asyncio.run(daemon.serve())
    except StartupError as exc:
        print(f"codi2: {exc}", file=sys.stderr)
        return EXIT_FAILURE
