"""A WorkspaceSpec → the Kubernetes objects of one user's workspace, as plain manifests.

The sidecar layout (docs/security.md): the user's container runs the workspace image's own command and
mounts only `/workspace`; codi2 runs beside it as a native sidecar (an init container with `restartPolicy:
Always`: up before the user's container starts, stopped after it exits) under its own uid, with `/workspace`
read-only, its state on a claim of its own and the store's material from a Secret, none of which the user's
container mounts.
"""

from __future__ import annotations

import base64
import math
import tomllib
from typing import Any

import yaml

from codi2.config import ServerSettings
from codi2.provisioning.spec import Resources, WorkspaceSpec

HEALTH_PORT = 8765
WORKSPACE_DIR = "/workspace"
CONFIG_DIR = "/etc/codi2"
FDB_DIR = "/etc/foundationdb"
STATE_DIR = "/var/lib/codi2"
CONFIG_MAP = "codi2-config"
FDB_SECRET = "codi2-fdb"
# The trail's HMAC key: a Secret of its own, so rotating it touches neither the store's Secret nor its mount.
INTEGRITY_SECRET = "codi2-integrity"
INTEGRITY_DIR = "/etc/codi2-integrity"
INTEGRITY_FILE = "key"
STATE_CLAIM = "codi2-state"
NETWORK_POLICY = "codi2-health"
# Long enough for the start-up walk of a big workspace (readiness waits for it): 60 x 5 s.
STARTUP_PERIOD_S, STARTUP_FAILURES = 5, 60
# Pod termination stops the user's container first and codi2 after it; codi2 then drains for up to its
# `[server] shutdown_timeout_s` (20 s by default: 60 s in all). The margin is the user's container's own shutdown.
GRACE_MARGIN_S = 40
USER_UID = 1000  # the workspace image's user; also the pod's fsGroup, so both containers can read /workspace
CODI2_UID = 10001  # codi2's own: the user's processes cannot signal or trace it, nor spend its inotify watches
SECRET_MODE = 0o440  # root-owned, readable by the fsGroup: only a container that mounts the Secret sees it
NO_PRIVILEGE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
# Spec field → file in the codi2-fdb Secret → the [foundationdb] key codi2 reads it from (as env).
TLS_FILES = (
    ("fdb_tls_cert", "tls.crt", "CODI2_FOUNDATIONDB__TLS_CERT_FILE"),
    ("fdb_tls_key", "tls.key", "CODI2_FOUNDATIONDB__TLS_KEY_FILE"),
    ("fdb_tls_ca", "ca.crt", "CODI2_FOUNDATIONDB__TLS_CA_FILE"),
)
PROVISIONER = "codi2-provisioner"
PROVISIONER_NAMESPACE = "coditect-app"

Manifest = dict[str, Any]


def labels(spec: WorkspaceSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "workspace",
        "app.kubernetes.io/managed-by": "codi2",
        "coditect.ai/user-workspace": spec.user_id,
        "coditect.ai/tenant": spec.tenant_id,
        **spec.labels,
    }


def _meta(name: str, spec: WorkspaceSpec, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = labels(spec)
    return meta


def _secret(spec: WorkspaceSpec, name: str, files: dict[str, bytes]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, spec, spec.namespace),
        "type": "Opaque",
        "data": {file: base64.b64encode(content).decode() for file, content in files.items()},
    }


def render(spec: WorkspaceSpec) -> list[Manifest]:
    """Namespace, volume claims, config map, store Secret (and, with a key, the integrity Secret), network
    policy and the workspace pod, in the order to apply them."""
    spec.check_integrity()
    ns = spec.namespace
    claims = [_claim(spec, spec.claim_name, spec.storage_size)]
    if spec.layout == "sidecar":
        claims.append(_claim(spec, STATE_CLAIM, spec.state_storage_size))
    store_files = {"fdb.cluster": spec.cluster_string().strip() + "\n"}
    store_files.update({name: getattr(spec, field) for field, name, _ in TLS_FILES if getattr(spec, field)})
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns, spec)},
        *claims,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(CONFIG_MAP, spec, ns),
            "data": {"codi2.toml": spec.codi2_config},
        },
        _secret(spec, FDB_SECRET, {name: text.encode() for name, text in store_files.items()}),
        *([_secret(spec, INTEGRITY_SECRET, {INTEGRITY_FILE: spec.integrity_key})] if spec.integrity_key else []),
        _network_policy(spec),
        _pod(spec),
    ]


def _claim(spec: WorkspaceSpec, name: str, size: str) -> Manifest:
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if spec.storage_class:
        claim["storageClassName"] = spec.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(name, spec, spec.namespace),
        "spec": claim,
    }


def _network_policy(spec: WorkspaceSpec) -> Manifest:
    """The health port admits only the platform's and the monitoring namespaces. Once a policy selects the
    pod, every other ingress to it is denied: the platform adds its own policy for the IDE's ports."""
    namespaces = [*spec.platform_namespaces, *spec.monitoring_namespaces]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(NETWORK_POLICY, spec, spec.namespace),
        "spec": {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "workspace", "coditect.ai/user-workspace": spec.user_id}
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchExpressions": [
                                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}
                                ]
                            }
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": HEALTH_PORT}],
                }
            ],
        },
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "health"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def _resources(r: Resources) -> dict[str, Any]:
    return {
        "requests": {"cpu": r.cpu_request, "memory": r.memory_request},
        "limits": {"cpu": r.cpu_limit, "memory": r.memory_limit},
    }


def _mount(name: str, path: str, read_only: bool = False) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": name, "mountPath": path}
    if read_only:
        mount["readOnly"] = True
    return mount


def _codi2(
    spec: WorkspaceSpec,
    *,
    name: str,
    image: str,
    resources: Resources,
    security: dict[str, Any],
    mounts: list[dict[str, Any]],
    sidecar: bool,
) -> dict[str, Any]:
    """The codi2 container: its command, identity, health port and probes."""
    env = [
        {"name": "USER_ID", "value": spec.user_id},
        {"name": "TENANT_ID", "value": spec.tenant_id},
        {"name": "FDB_CLUSTER_FILE", "value": f"{FDB_DIR}/fdb.cluster"},
    ]
    if spec.session_id:
        env.insert(2, {"name": "SESSION_ID", "value": spec.session_id})
    env += [{"name": var, "value": f"{FDB_DIR}/{file}"} for field, file, var in TLS_FILES if getattr(spec, field)]
    if spec.integrity_key:
        # Env, not the config map: the path is the pod's layout, like the TLS files', and env outranks codi2.toml.
        env.append({"name": "CODI2_INTEGRITY__KEY_FILE", "value": f"{INTEGRITY_DIR}/{INTEGRITY_FILE}"})
    container: dict[str, Any] = {"name": name, "image": image}
    if sidecar:
        container["restartPolicy"] = "Always"  # a native sidecar: up before the user's container, stops after it
        env.append({"name": "CODI2_STATE__DIR", "value": STATE_DIR})
    container.update(
        {
            "command": ["/usr/local/bin/codi2"],
            "args": ["--config", f"{CONFIG_DIR}/codi2.toml", "--user-id", spec.user_id, "--tenant-id", spec.tenant_id],
            "env": env,
            "ports": [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
            "startupProbe": _probe("/readyz", STARTUP_PERIOD_S, STARTUP_FAILURES),
            "livenessProbe": _probe("/livez", 10, 3),
            "readinessProbe": _probe("/readyz", 5, 3),
            "resources": _resources(resources),
            "securityContext": security,
            "volumeMounts": mounts,
        }
    )
    return container


def _grace_period_s(spec: WorkspaceSpec) -> int:
    """Long enough for codi2's drain, read from the config it is given: Kubernetes' SIGKILL must not cut it."""
    server = tomllib.loads(spec.codi2_config).get("server", {})
    keys = {"shutdown_timeout_s": server["shutdown_timeout_s"]} if "shutdown_timeout_s" in server else {}
    return math.ceil(ServerSettings(**keys).shutdown_timeout_s) + GRACE_MARGIN_S


def _pod(spec: WorkspaceSpec) -> Manifest:
    workspace = {"name": "workspace", "persistentVolumeClaim": {"claimName": spec.claim_name}}
    config = {"name": CONFIG_MAP, "configMap": {"name": CONFIG_MAP}}
    store = {"name": FDB_SECRET, "secret": {"secretName": FDB_SECRET, "defaultMode": SECRET_MODE}}
    config_mount = _mount(CONFIG_MAP, CONFIG_DIR, read_only=True)
    store_mount = _mount(FDB_SECRET, FDB_DIR, read_only=True)
    if spec.layout == "entrypoint":
        # One container whose command is codi2: whatever else runs in it holds the store's material and can
        # rewrite codi2's state in /workspace/.codi2 (docs/security.md). For local use.
        volumes = [workspace, config, store]
        containers: dict[str, Any] = {
            "containers": [
                _codi2(
                    spec,
                    name="workspace",
                    image=spec.workspace_image,
                    resources=spec.resources,
                    security=NO_PRIVILEGE,
                    mounts=[_mount("workspace", WORKSPACE_DIR), config_mount, store_mount],
                    sidecar=False,
                )
            ]
        }
    else:
        state = {"name": STATE_CLAIM, "persistentVolumeClaim": {"claimName": STATE_CLAIM}}
        volumes = [workspace, state, config, store]
        mounts = [
            _mount("workspace", WORKSPACE_DIR, read_only=True),
            _mount(STATE_CLAIM, STATE_DIR),
            config_mount,
            store_mount,
        ]
        if spec.integrity_key:  # codi2's alone, like the store's Secret: the user's container never mounts it
            volumes.append(
                {"name": INTEGRITY_SECRET, "secret": {"secretName": INTEGRITY_SECRET, "defaultMode": SECRET_MODE}}
            )
            mounts.append(_mount(INTEGRITY_SECRET, INTEGRITY_DIR, read_only=True))
        codi2 = _codi2(
            spec,
            name="codi2",
            image=spec.sidecar_image,
            resources=spec.codi2_resources,
            security={**NO_PRIVILEGE, "runAsUser": CODI2_UID, "runAsGroup": CODI2_UID, "readOnlyRootFilesystem": True},
            mounts=mounts,
            sidecar=True,
        )
        user = {
            "name": "workspace",
            "image": spec.workspace_image,
            "resources": _resources(spec.resources),
            "securityContext": NO_PRIVILEGE,
            "volumeMounts": [_mount("workspace", WORKSPACE_DIR)],
        }
        containers = {"initContainers": [codi2], "containers": [user]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta("workspace", spec, spec.namespace),
        "spec": {
            "terminationGracePeriodSeconds": _grace_period_s(spec),
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsUser": USER_UID,
                "runAsGroup": USER_UID,
                "fsGroup": USER_UID,
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            **containers,
            "volumes": volumes,
        },
    }


def render_rbac() -> list[Manifest]:
    """What `codi2 provision apply` needs. Namespaces are cluster-scoped, so this is a ClusterRole: a
    namespaced Role cannot grant creating them. Secrets can be written but not read: server-side apply
    and delete need no `get`, and a provisioner that can read every Secret in the cluster is a target."""
    meta = {"labels": {"app.kubernetes.io/name": PROVISIONER, "app.kubernetes.io/managed-by": "codi2"}}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": PROVISIONER, "namespace": PROVISIONER_NAMESPACE, **meta},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": PROVISIONER, **meta},
            "rules": [
                {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "create", "patch", "delete"]},
                {
                    "apiGroups": [""],
                    "resources": ["persistentvolumeclaims", "configmaps", "pods"],
                    "verbs": ["get", "list", "watch", "create", "patch", "delete"],
                },
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch", "delete"]},
                {
                    "apiGroups": ["networking.k8s.io"],
                    "resources": ["networkpolicies"],
                    "verbs": ["create", "patch", "delete"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": PROVISIONER, **meta},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": PROVISIONER},
            "subjects": [{"kind": "ServiceAccount", "name": PROVISIONER, "namespace": PROVISIONER_NAMESPACE}],
        },
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded codi2.toml) as literal blocks, and no anchors or aliases where two
    fields share a value: manifests are read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifests: list[Manifest]) -> str:
    """Multi-document YAML, keys in the order written (as people read manifests)."""
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=120)
