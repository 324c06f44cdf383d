"""`codi2 provision render|apply|delete|rbac`: provisioning's own commands.

Imported by the top parser of every `codi2` command, so at import time it holds only the parser: the
spec (pydantic), the renderer (YAML) and the Kubernetes client (lightkube) are imported when a provision
command runs. Like the rest of provisioning, it never imports the data path.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codi2 import __version__
from codi2.cli.common import DIRECTORY, EXIT_FAILURE, EXIT_OK, FILE, Parser, UsageError, completes

if TYPE_CHECKING:
    from codi2.cli.common import Subparsers
    from codi2.provisioning.spec import WorkspaceSpec

# The codi2-config map without --config: the daemon's defaults (watch /workspace, health on :8765, JSON logs),
# its store the cluster of the codi2-fdb Secret, which the pod names in FDB_CLUSTER_FILE. Nothing read from
# disk, so the command works wherever it runs (the zipapp outside the repo).
DEFAULT_CONFIG = """\
# codi2.toml rendered by `codi2 provision` without --config: the defaults (docs/config.md), the store
# FoundationDB through the cluster file of the codi2-fdb Secret (FDB_CLUSTER_FILE).
[storage]
backend = "fdb"
"""


def register(sub: Subparsers) -> None:
    provision = sub.add_parser(
        "provision",
        help="render, apply or delete a user's workspace on Kubernetes",
        description="Provision a user's workspace: namespace, volume claims, config map, store Secret, network "
        "policy and the workspace pod.",
    )
    actions = provision.add_subparsers(dest="provision_command", metavar="COMMAND", parser_class=Parser, required=True)
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
        p.add_argument(
            "--registry",
            default=os.environ.get("CODI2_REGISTRY"),
            help="where the images are, e.g. gcr.io/PROJECT (default: $CODI2_REGISTRY): REGISTRY/t2-workspace-pod:TAG "
            "and REGISTRY/codi2:TAG; with --layout entrypoint, REGISTRY/codi2-workspace:TAG",
        )
        p.add_argument("--tag", default=__version__, help=f"the images' tag (default: this release, {__version__})")
        p.add_argument("--image", help="the user's workspace image in full (default: REGISTRY/t2-workspace-pod:TAG)")
        p.add_argument("--codi2-image", help="codi2's image for the sidecar in full (default: REGISTRY/codi2:TAG)")
        p.add_argument("--storage", default="50Gi", help="size of the workspace volume claim (default 50Gi)")
        p.add_argument("--state-storage", default="2Gi", help="size of codi2's state claim (default 2Gi)")
        p.add_argument("--storage-class", help="storage class of the claim (default: the cluster's default)")
        config = p.add_argument(
            "--config",
            type=Path,
            metavar="PATH",
            help="codi2.toml for the codi2-config map (default: the daemon's defaults with the store of the "
            "codi2-fdb Secret; the cluster string then comes from --fdb-cluster-string)",
        )
        completes(config, FILE)
        p.add_argument("--fdb-cluster-string", help="fdb.cluster content (default: the config's cluster_string)")
        p.add_argument("--fdb-tls-cert", type=Path, metavar="PATH", help="codi2's client certificate (PEM) for TLS")
        p.add_argument("--fdb-tls-key", type=Path, metavar="PATH", help="its private key (PEM, no passphrase)")
        p.add_argument("--fdb-tls-ca", type=Path, metavar="PATH", help="the CA bundle that signed the cluster (PEM)")
        key = p.add_argument(
            "--integrity-key-file",
            type=Path,
            metavar="PATH",
            help="the trail's HMAC key ([integrity] key_file: 32 to 4096 bytes, e.g. head -c 32 /dev/urandom) for "
            "the codi2-integrity Secret, mounted only into codi2 (sidecar layout); never printed",
        )
        completes(key, FILE)
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
            completes(
                p.add_argument("--output-dir", type=Path, help="write one file per object here instead of stdout"),
                DIRECTORY,
            )
        if name == "apply":
            p.add_argument("--wait-timeout", type=float, default=300.0, help="seconds to wait for Ready (300)")
            p.add_argument("--no-wait", action="store_true", help="return once the objects are applied")
        p.set_defaults(func=command)
    rbac = actions.add_parser(
        "rbac",
        help="print the RBAC objects that `provision apply` needs",
        description="Print the ServiceAccount, ClusterRole and ClusterRoleBinding `provision apply` runs as.",
    )
    rbac.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
    completes(rbac.add_argument("--output-dir", type=Path, help="write rbac.yaml here instead of stdout"), DIRECTORY)
    rbac.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from codi2.provisioning.render import render, render_rbac

    if args.provision_command == "rbac":
        _write_manifests(render_rbac(), args.output_dir, single="rbac.yaml")
        return EXIT_OK
    spec = _workspace_spec(args)
    manifests = render(spec)
    if args.provision_command == "render":
        _write_manifests(manifests, args.output_dir)
        return EXIT_OK
    from codi2.provisioning.apply import ClusterError, Provisioner, connect

    try:
        provisioner = Provisioner(*connect(), progress=lambda line: print(line, flush=True))
        if args.provision_command == "delete":
            provisioner.delete(manifests)
            return EXIT_OK
        provisioner.apply(manifests)
        if not args.no_wait:
            provisioner.wait_ready(spec.namespace, "workspace", args.wait_timeout)
    except ClusterError as exc:
        print(f"codi2: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _workspace_spec(args: argparse.Namespace) -> WorkspaceSpec:
    from pydantic import ValidationError

    from codi2.provisioning.spec import WorkspaceSpec, read_key_file

    try:
        config_text = DEFAULT_CONFIG if args.config is None else args.config.read_text()
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
    if args.integrity_key_file is not None:
        try:
            fields["integrity_key"] = read_key_file(args.integrity_key_file)
        except ValueError as exc:
            raise UsageError(f"--integrity-key-file {args.integrity_key_file}: {exc}") from None
    optional = {
        "registry": args.registry,
        "image_tag": args.tag,
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
        "image_tag": "--tag",
        "labels": "--label",
        "platform_namespaces": "--platform-namespace",
        "monitoring_namespaces": "--monitoring-namespace",
        "integrity_key": f"--integrity-key-file {args.integrity_key_file}",
    }
    try:
        spec = WorkspaceSpec(**fields)
        spec.cluster_string()
        spec.check_integrity()
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "registry"  # the one check of several fields
        flag = flags.get(field, "--" + field.replace("_", "-"))
        raise UsageError(f"{flag}: {str(error['msg']).removeprefix('Value error, ')}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        if args.config is None:
            raise UsageError(
                "no FDB cluster string: give --fdb-cluster-string, or a --config that sets [foundationdb] "
                "cluster_string"
            ) from None
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
