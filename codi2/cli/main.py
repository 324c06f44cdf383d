"""`codi2` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.

`codi2 --config PATH --user-id U --tenant-id T` with no subcommand means `run`: that is how the
workspace pod template calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from codi2 import __version__
from codi2.config import ConfigError, Settings, load_settings
from codi2.trail.events import ACTIONS, Event, EventQuery, parse_time

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
FILE, DIRECTORY = "file", "directory"  # what an option's value completes with (shtab, in `_completion`)
FOLLOW_POLL_S = 0.5
SUBCOMMANDS = {"run", "events", "verify", "config", "test", "provision", "completion"}


class UsageError(Exception):
    """Bad input on the command line: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("CODI2_CONFIG"),
        metavar="PATH",
        help="codi2.toml to load (default: $CODI2_CONFIG; without either, built-in defaults and env only)",
    ).complete = FILE  # type: ignore[attr-defined]
    parser.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="codi2",
        description="Workspace audit daemon: every file change under the watch paths becomes an audit event.",
        epilog="With no subcommand, `codi2 [--config PATH] [--user-id U] [--tenant-id T]` runs the daemon.",
    )
    parser.add_argument("--version", action="version", version=f"codi2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run the daemon (the default)", description="Run the daemon in the foreground.")
    _config_arg(run)
    run.add_argument("--user-id", help="user the events belong to (default: $USER_ID)")
    run.add_argument("--tenant-id", help="tenant the events are scoped to (default: $TENANT_ID)")
    run.add_argument("--session-id", help="IDE session id recorded in each event (default: $SESSION_ID)")

    events = sub.add_parser(
        "events",
        help="read the audit trail back, oldest first",
        description="Print audit events from the configured store, oldest first.",
    )
    _config_arg(events)
    events.add_argument("--tenant-id", help="tenant to read (default: the configured identity, $TENANT_ID)")
    events.add_argument("--path", metavar="GLOB", help="only events whose path or dest_path matches (* spans /)")
    events.add_argument("--action", choices=ACTIONS, help="only events with this action")
    events.add_argument("--since", metavar="ISO8601", help="only events at or after this time (UTC if no zone)")
    events.add_argument("--limit", type=int, metavar="N", help="print at most N events")
    events.add_argument("--follow", action="store_true", help="keep printing new events until interrupted")
    events.add_argument(
        "--replay",
        action="store_true",
        help="print the workspace state the trail implies (fold of the selected events), one JSON line per entry",
    )
    events.add_argument(
        "--format",
        choices=("jsonl", "table"),
        help="jsonl (default when stdout is not a terminal) or table (default on a terminal)",
    )

    verify = sub.add_parser(
        "verify",
        help="check the trail's hash chains: nothing removed, altered, reordered or inserted",
        description="Walk every stream of the tenant's trail and check each batch's link; print per stream its "
        "batches, events, first and last time, head and every break. Exit 0 when the trail is intact, 1 "
        "otherwise (docs/trail-format.md).",
    )
    _config_arg(verify)
    verify.add_argument("--tenant-id", help="tenant to check (default: the configured identity, $TENANT_ID)")
    verify.add_argument(
        "--since", metavar="ISO8601", help="check each stream from its first batch journaled at or after this time"
    )
    verify.add_argument(
        "--key-file",
        type=Path,
        action="append",
        metavar="FILE",
        help="an HMAC key the trail is sealed with; repeat it for every key still in the trail (default: "
        "[integrity] key_file)",
    ).complete = FILE  # type: ignore[attr-defined]
    verify.add_argument("--json", action="store_true", help="print the report as one JSON document")
    verify.add_argument(
        "--disk",
        type=Path,
        metavar="PATH",
        help="also fold the whole trail and compare it with this workspace (the user's, see --user-id)",
    ).complete = DIRECTORY  # type: ignore[attr-defined]
    verify.add_argument(
        "--user-id", help="whose workspace --disk is (default: the configured identity; needed with several users)"
    )

    test = sub.add_parser(
        "test",
        help="check the configured store step by step (library, cluster file, reachability, a probe write)",
        description="Check the configured store step by step; exit 0 when every step passes, 1 otherwise.",
    )
    _config_arg(test)
    test.add_argument("--tenant-id", help="tenant whose prefix the probe key goes under (default: configured)")
    test.add_argument("--json", action="store_true", help="print the steps as one JSON document")

    _provision_parsers(sub)

    config = sub.add_parser("config", help="configuration tools", description="Configuration tools.")
    config_sub = config.add_subparsers(dest="config_command", metavar="COMMAND", parser_class=_Parser, required=True)
    check = config_sub.add_parser(
        "check",
        help="validate the config and print it as the daemon would use it",
        description="Validate the config (file, env, flags) and print the effective settings as JSON.",
    )
    _config_arg(check)
    config_sub.add_parser(
        "reference",
        help="print every key as Markdown (docs/config.md)",
        description="Print every config key with its type, default, environment variable and description.",
    )

    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for bash or zsh, generated from this parser (see the README).",
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _provision_parsers(sub: Any) -> None:
    provision = sub.add_parser(
        "provision",
        help="render, apply or delete a user's workspace on Kubernetes",
        description="Provision a user's workspace: namespace, volume claims, config map, store Secret, network "
        "policy and the workspace pod.",
    )
    actions = provision.add_subparsers(dest="provision_command", metavar="COMMAND", parser_class=_Parser, required=True)
    helps = {
        "render": "print the manifests as multi-document YAML",
        "apply": "create or update the objects by server-side apply, then wait for the pod to be Ready",
        "delete": "delete the objects",
    }
    for name, text in helps.items():
        p = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
        p.add_argument("--user-id", required=True, help="user id (a DNS-1123 label: the namespace is user-<id>)")
        p.add_argument("--tenant-id", required=True, help="tenant id (a DNS-1123 label)")
        p.add_argument("--session-id", help="IDE session id passed to codi2 as SESSION_ID")
        p.add_argument(
            "--layout",
            choices=("sidecar", "entrypoint"),
            default="sidecar",
            help="sidecar (default): codi2 beside the user's container, which holds neither the store's "
            "credentials nor codi2's state; entrypoint: one container running codi2, for local use only",
        )
        p.add_argument("--image", help="the user's workspace image (default: the seed's t2-workspace-pod image)")
        p.add_argument("--codi2-image", help="codi2's image for the sidecar (default: the seed's codi2 image)")
        p.add_argument("--storage", default="50Gi", help="size of the workspace volume claim (default 50Gi)")
        p.add_argument("--state-storage", default="2Gi", help="size of codi2's state claim (default 2Gi)")
        p.add_argument("--storage-class", help="storage class of the claim (default: the cluster's default)")
        p.add_argument(
            "--config",
            type=Path,
            default=Path("config/codi2.toml"),
            metavar="PATH",
            help="codi2.toml for the codi2-config map (default: config/codi2.toml)",
        ).complete = FILE  # type: ignore[attr-defined]
        p.add_argument("--fdb-cluster-string", help="fdb.cluster content (default: the config's cluster_string)")
        p.add_argument("--fdb-tls-cert", type=Path, metavar="PATH", help="codi2's client certificate (PEM) for TLS")
        p.add_argument("--fdb-tls-key", type=Path, metavar="PATH", help="its private key (PEM, no passphrase)")
        p.add_argument("--fdb-tls-ca", type=Path, metavar="PATH", help="the CA bundle that signed the cluster (PEM)")
        p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="extra label (repeatable)")
        p.add_argument(
            "--platform-namespace",
            action="append",
            metavar="NS",
            help="namespace admitted to the health port (repeatable; default coditect-app)",
        )
        p.add_argument(
            "--monitoring-namespace",
            action="append",
            metavar="NS",
            help="monitoring namespace admitted to the health port (repeatable; default monitoring)",
        )
        if name == "render":
            p.add_argument(
                "--output-dir", type=Path, help="write one file per object here instead of stdout"
            ).complete = DIRECTORY  # type: ignore[attr-defined]
        if name == "apply":
            p.add_argument("--wait-timeout", type=float, default=300.0, help="seconds to wait for Ready (300)")
            p.add_argument("--no-wait", action="store_true", help="return once the objects are applied")
    rbac = actions.add_parser(
        "rbac",
        help="print the RBAC objects that `provision apply` needs",
        description="Print the ServiceAccount, ClusterRole and ClusterRoleBinding `provision apply` runs as.",
    )
    rbac.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
    rbac.add_argument("--output-dir", type=Path, help="write rbac.yaml here instead of stdout").complete = DIRECTORY  # type: ignore[attr-defined]


def _normalise(argv: Sequence[str]) -> list[str]:
    """No subcommand means `run`, as the pod template calls it."""
    args = list(argv)
    if not args or (args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help", "--version")):
        return ["run", *args]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_normalise(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "events":
            return _events(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "test":
            return _test(args)
        if args.command == "provision":
            return _provision(args)
        if args.command == "completion":
            return _completion(args)
        if args.config_command == "reference":
            return _config_reference()
        return _config_check(args)
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


def _load(args: argparse.Namespace, **cli: Any) -> Settings:
    return load_settings(args.config, **cli)


def _run(args: argparse.Namespace) -> int:
    from codi2.daemon.build import build
    from codi2.daemon.daemon import Daemon, StartupError
    from codi2.logs import configure_logging
    from codi2.trail.events import Identity

    settings = _load(args, user_id=args.user_id, tenant_id=args.tenant_id, session_id=args.session_id)
    missing = [name for name in ("tenant_id", "user_id") if not getattr(settings, name)]
    if missing:
        flags = ", ".join(f"--{m.replace('_', '-')} or ${m.upper()}" for m in missing)
        raise UsageError(f"{' and '.join(missing)} required to run (set {flags})")
    configure_logging(settings.logging.level, settings.logging.format)
    identity = Identity(settings.tenant_id or "", settings.user_id or "", settings.session_id, settings.pod)
    daemon = Daemon(build(settings, identity))
    try:
        return asyncio.run(daemon.serve())
    except StartupError as exc:
        print(f"codi2: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _test(args: argparse.Namespace) -> int:
    from codi2.cli.checks import render, run_checks

    settings = _load(args, tenant_id=args.tenant_id)
    steps = []
    for step in run_checks(settings, args.config):
        steps.append(step)
        if not args.json:
            print(render([step], as_json=False), flush=True)
    if args.json:
        print(render(steps, as_json=True))
    return EXIT_OK if all(s.ok for s in steps) else EXIT_FAILURE


def _workspace_spec(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from codi2.provisioning.spec import WorkspaceSpec

    try:
        config_text = args.config.read_text()
    except OSError as exc:
        raise UsageError(f"--config {args.config}: {exc.strerror}") from None
    tls_files = _tls_files(args)
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    fields: dict[str, Any] = {
        "user_id": args.user_id,
        "tenant_id": args.tenant_id,
        "session_id": args.session_id,
        "layout": args.layout,
        "storage_size": args.storage,
        "state_storage_size": args.state_storage,
        "storage_class": args.storage_class,
        "codi2_config": config_text,
        "fdb_cluster_string": args.fdb_cluster_string,
        "labels": labels,
        **tls_files,
    }
    optional = {
        "image": args.image,
        "codi2_image": args.codi2_image,
        "platform_namespaces": args.platform_namespace,
        "monitoring_namespaces": args.monitoring_namespace,
    }
    fields.update({key: value for key, value in optional.items() if value is not None})
    flags = {
        "storage_size": "--storage",
        "state_storage_size": "--state-storage",
        "codi2_config": "--config",
        "labels": "--label",
        "platform_namespaces": "--platform-namespace",
        "monitoring_namespaces": "--monitoring-namespace",
    }
    try:
        spec = WorkspaceSpec(**fields)
        spec.cluster_string()
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0])
        flag = flags.get(field, "--" + field.replace("_", "-"))
        raise UsageError(f"{flag}: {str(error['msg']).removeprefix('Value error, ')}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"--config {args.config}: {exc}") from None
    return spec


def _tls_files(args: argparse.Namespace) -> dict[str, str]:
    """The TLS files to put into the Secret, checked first: a bad key would reach every workspace."""
    from codi2.cli.tls import file_problems

    if (args.fdb_tls_cert is None) != (args.fdb_tls_key is None):
        raise UsageError("--fdb-tls-cert and --fdb-tls-key go together: give both or neither")
    problems = file_problems(args.fdb_tls_cert, args.fdb_tls_key, args.fdb_tls_ca)
    if problems:
        raise UsageError("; ".join(problems))
    paths = {"fdb_tls_cert": args.fdb_tls_cert, "fdb_tls_key": args.fdb_tls_key, "fdb_tls_ca": args.fdb_tls_ca}
    return {field: path.read_text() for field, path in paths.items() if path is not None}


def _write_manifests(manifests: list[dict[str, Any]], out: Path | None, single: str | None = None) -> None:
    from codi2.provisioning.render import to_yaml

    if out is None:
        print(to_yaml(manifests), end="")
        return
    out.mkdir(parents=True, exist_ok=True)
    if single is not None:
        (out / single).write_text(to_yaml(manifests))
        return
    for manifest in manifests:
        (out / f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml").write_text(to_yaml([manifest]))


def _provision(args: argparse.Namespace) -> int:
    from codi2.provisioning.render import render, render_rbac

    if args.provision_command == "rbac":
        _write_manifests(render_rbac(), args.output_dir, single="rbac.yaml")
        return EXIT_OK
    spec = _workspace_spec(args)
    manifests = render(spec)
    if args.provision_command == "render":
        _write_manifests(manifests, args.output_dir)
        return EXIT_OK
    from codi2.provisioning.apply import Provisioner, connect

    provisioner = Provisioner(connect(), progress=lambda line: print(line, flush=True))
    if args.provision_command == "delete":
        provisioner.delete(manifests)
        return EXIT_OK
    provisioner.apply(manifests)
    if not args.no_wait:
        provisioner.wait_ready(spec.namespace, "workspace", args.wait_timeout)
    return EXIT_OK


def _config_check(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(json.dumps(settings.effective(), indent=2))
    return EXIT_OK


def _config_reference() -> int:
    from codi2.cli.config_reference import render

    print(render(), end="")
    return EXIT_OK


def _completion(args: argparse.Namespace) -> int:
    import shtab  # only here: every other command starts faster without it

    parser = build_parser()
    kinds = {FILE: shtab.FILE, DIRECTORY: shtab.DIRECTORY}
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if getattr(action, "complete", None) in kinds:
                action.complete = kinds[action.complete]  # type: ignore[attr-defined]
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    print(shtab.complete(parser, args.shell), end="")
    return EXIT_OK


def _events(args: argparse.Namespace) -> int:
    from codi2.stores.base import open_sink

    settings = _load(args, tenant_id=args.tenant_id)
    if not settings.tenant_id:
        raise UsageError("tenant_id required (set --tenant-id or $TENANT_ID)")
    if args.limit is not None and args.limit < 0:
        raise UsageError("--limit: must be 0 or more")
    query = EventQuery(settings.tenant_id, args.path, args.action, _since(args), args.limit)
    fmt = args.format or ("table" if sys.stdout.isatty() else "jsonl")
    if args.limit == 0 and not args.replay:
        return EXIT_OK
    sink = open_sink(settings, create=False)
    if args.replay:
        try:
            return _replay(sink.read(query))
        finally:
            sink.close()
    printed = 0
    after = None
    try:
        while True:
            for cursor, event in sink.read(query, after=after):
                after = cursor  # --follow resumes after the last event printed
                if fmt == "jsonl":
                    print(event.to_json())
                else:
                    print(_table_row(event.to_dict(), header=printed == 0))
                printed += 1
                if args.limit is not None and printed >= args.limit:
                    return EXIT_OK
            if not args.follow:
                return EXIT_OK
            sys.stdout.flush()
            time.sleep(FOLLOW_POLL_S)
    finally:
        sink.close()


def _since(args: argparse.Namespace) -> datetime | None:
    try:
        return parse_time(args.since) if args.since else None
    except ValueError:
        raise UsageError(f"--since: not an ISO 8601 time: {args.since!r}") from None


def _verify(args: argparse.Namespace) -> int:
    from codi2.config import STATE_DIR_NAME
    from codi2.stores.base import open_sink
    from codi2.trail import verify
    from codi2.trail.chain import load_key

    settings = _load(args, tenant_id=args.tenant_id, user_id=args.user_id)
    if not settings.tenant_id:
        raise UsageError("tenant_id required (set --tenant-id or $TENANT_ID)")
    since = _since(args)
    configured = settings.integrity.key_file
    keys = []
    for path in args.key_file or ([configured] if configured else []):
        try:
            keys.append(load_key(path))
        except ValueError as exc:
            raise UsageError(f"{'--key-file' if args.key_file else 'integrity.key_file'}: {exc}") from None
    sink = open_sink(settings, create=False)
    try:
        report = verify.verify(sink, settings.tenant_id, keys, since)
        if args.disk is not None:
            ignores = [*settings.monitoring.ignore_patterns, STATE_DIR_NAME]
            report.disk = verify.compare_disk(sink, settings.tenant_id, args.disk, settings.user_id, ignores)
    except verify.VerifyError as exc:
        raise UsageError(str(exc)) from None
    finally:
        sink.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else verify.render(report))
    return EXIT_OK if report.ok else EXIT_FAILURE


def _replay(rows: Iterator[tuple[Any, Event]]) -> int:
    from codi2.trail.replay import fold

    state = fold(event for _, event in rows)
    for (root, path), entry in sorted(state.items()):
        print(json.dumps({"root": root, "path": path, "type": entry.type, "sha256": entry.sha256}))
    return EXIT_OK


def _printable(path: str) -> str:
    """Newlines and undecodable bytes shown as escapes, so one event stays one table row."""
    return path.encode("unicode_escape").decode("ascii") if not path.isprintable() else path


def _table_row(e: dict[str, Any], *, header: bool) -> str:
    path = _printable(e["path"])
    if e["dest_path"] is not None:
        path += f" -> {_printable(e['dest_path'])}"
    row = f"{e['ts']:<28} {e['action']:<8} {e['type']:<7} {e['size'] if e['size'] is not None else '-':>10}  {path}"
    if header:
        return f"{'TS':<28} {'ACTION':<8} {'TYPE':<7} {'SIZE':>10}  PATH\n{row}"
    return row
