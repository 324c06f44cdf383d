"""`codi2 status`: the running daemon's `/status`, as a short summary for people or as JSON for scripts.

Exit 0 when the daemon is ok, 1 when it is degraded, 2 when nothing answers: a script can tell "running
but hurt" from "not running" without parsing anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from codi2.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, config_arg, load
from codi2.config import split_bind_addr

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers

TIMEOUT_S = 5.0
EXIT_UNREACHABLE = EXIT_USAGE
# An address the daemon listens on everywhere is reached on the loopback of the same family.
ANY = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def register(sub: Subparsers) -> None:
    status = sub.add_parser(
        "status",
        help="ask the running daemon how it is (its /status)",
        description="Print the running daemon's state: degraded reasons, roots, pending changes, spool, store, "
        "chain head and start-up scan. Exit 0 when ok, 1 when degraded, 2 when no daemon answers.",
    )
    config_arg(status)
    status.add_argument(
        "--url",
        help="the daemon's health server, e.g. http://127.0.0.1:8765 (default: from [server] bind_addr)",
    )
    status.add_argument("--json", action="store_true", help="print /status as the daemon sends it (one JSON line)")
    status.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    base = args.url or health_url(load(args).server.bind_addr)
    url = base.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status: dict[str, Any] = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"codi2: no daemon answering at {url} ({reason}): is `codi2 run` up? (--url, --config)", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(status, separators=(",", ":")) if args.json else summary(status))
    return EXIT_OK if status.get("status") == "ok" else EXIT_FAILURE


def health_url(bind_addr: str) -> str:
    """Where a client on this machine reaches a server listening on `bind_addr`."""
    host, port = split_bind_addr(bind_addr)
    host = ANY.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def summary(s: dict[str, Any]) -> str:
    """A few lines a person reads at a glance; every figure in them is in `--json` too."""
    ident = s.get("identity", {})
    store, spool, chain = s.get("store", {}), s.get("spool", {}), s.get("chain", {})
    lines = [f"codi2 {s.get('version', '?')}: {s.get('status', '?')}{'' if s.get('ready') else ', not ready'}"]
    lines += [f"  degraded: {reason}" for reason in s.get("degraded_reasons", [])]
    lines += [
        f"identity:      tenant {ident.get('tenant_id')}, user {ident.get('user_id')}, pod {ident.get('pod')}",
        f"roots:         {', '.join(s.get('watch_roots', [])) or 'none'} ({s.get('watches', 0)} watches)",
        f"initial scan:  {s.get('initial_scan', '?')}",
        f"pending:       {s.get('pipeline', {}).get('pending_changes', 0)} changes not yet journaled",
        f"spool:         {spool.get('events', 0)} events in {spool.get('batches', 0)} batches, "
        f"{spool.get('bytes', 0)} of {spool.get('max_bytes', 0)} bytes",
        f"store:         {store.get('backend', '?')} {store.get('state', '?')}"
        + (f" ({store.get('error_code')}: {store.get('error')})" if store.get("error") else "")
        + f", last commit {s.get('last_commit') or 'none'}",
        f"chain head:    batch {chain.get('batches', 0)} {chain.get('head') or '-'} (stream {chain.get('stream_id')})",
    ]
    return "\n".join(lines)
