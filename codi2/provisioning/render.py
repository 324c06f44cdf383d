"""A WorkspaceSpec → the Kubernetes objects of one user's workspace, as plain manifests."""

from __future__ import annotations

from typing import Any

import yaml

from codi2.provisioning.spec import WorkspaceSpec

HEALTH_PORT = 8765
CONFIG_DIR = "/etc/codi2"
FDB_DIR = "/etc/foundationdb"
# Long enough for the start-up walk of a big workspace (readiness waits for it): 60 x 5 s.
STARTUP_PERIOD_S, STARTUP_FAILURES = 5, 60
# codi2 drains inotify (5 s) and flushes to the store (20 s) after SIGTERM; the rest is margin.
GRACE_PERIOD_S = 45
RUN_AS = 1000
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


def render(spec: WorkspaceSpec) -> list[Manifest]:
    """Namespace, volume claim, the two config maps and the workspace pod, in the order to apply them."""
    ns = spec.namespace
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": spec.storage_size}},
    }
    if spec.storage_class:
        claim["storageClassName"] = spec.storage_class
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns, spec)},
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _meta(spec.claim_name, spec, ns),
            "spec": claim,
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("codi2-config", spec, ns),
            "data": {"codi2.toml": spec.codi2_config},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("fdb-cluster-config", spec, ns),
            "data": {"fdb.cluster": spec.cluster_string().strip() + "\n"},
        },
        _pod(spec),
    ]


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "health"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def _pod(spec: WorkspaceSpec) -> Manifest:
    env = [
        {"name": "USER_ID", "value": spec.user_id},
        {"name": "TENANT_ID", "value": spec.tenant_id},
        {"name": "FDB_CLUSTER_FILE", "value": f"{FDB_DIR}/fdb.cluster"},
    ]
    if spec.session_id:
        env.insert(2, {"name": "SESSION_ID", "value": spec.session_id})
    r = spec.resources
    container = {
        "name": "workspace",
        "image": spec.image,
        "command": ["/usr/local/bin/codi2"],
        "args": ["--config", f"{CONFIG_DIR}/codi2.toml", "--user-id", spec.user_id, "--tenant-id", spec.tenant_id],
        "env": env,
        "ports": [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "startupProbe": _probe("/readyz", STARTUP_PERIOD_S, STARTUP_FAILURES),
        "livenessProbe": _probe("/livez", 10, 3),
        "readinessProbe": _probe("/readyz", 5, 3),
        "resources": {
            "requests": {"cpu": r.cpu_request, "memory": r.memory_request},
            "limits": {"cpu": r.cpu_limit, "memory": r.memory_limit},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
        "volumeMounts": [
            {"name": "workspace", "mountPath": "/workspace"},
            {"name": "codi2-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "fdb-cluster-config", "mountPath": FDB_DIR, "readOnly": True},
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta("workspace", spec, spec.namespace),
        "spec": {
            "terminationGracePeriodSeconds": GRACE_PERIOD_S,
            "securityContext": {
                "runAsUser": RUN_AS,
                "runAsGroup": RUN_AS,
                "fsGroup": RUN_AS,
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [
                {"name": "workspace", "persistentVolumeClaim": {"claimName": spec.claim_name}},
                {"name": "codi2-config", "configMap": {"name": "codi2-config"}},
                {"name": "fdb-cluster-config", "configMap": {"name": "fdb-cluster-config"}},
            ],
        },
    }


def render_rbac() -> list[Manifest]:
    """What `codi2 provision apply` needs. Namespaces are cluster-scoped, so this is a ClusterRole: a
    namespaced Role cannot grant creating them."""
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
    """Multi-line strings (the embedded codi2.toml) as literal blocks, readable in the manifest."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifests: list[Manifest]) -> str:
    """Multi-document YAML, keys in the order written (as people read manifests)."""
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=120)
