"""Create, update and delete a workspace through the Kubernetes API (lightkube).

Every object is sent as a server-side apply with field manager `codi2`, so applying the same spec twice
changes nothing and a changed spec updates exactly the fields codi2 owns. The client is configured as
kubectl would be: in-cluster service account first, then `KUBECONFIG` or `~/.kube/config`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
from lightkube import ApiError, Client, ConfigError, codecs
from lightkube.config.kubeconfig import KubeConfig
from lightkube.resources.core_v1 import Pod

from codi2.provisioning.render import Manifest

FIELD_MANAGER = "codi2"
POLL_S = 1.0


class ClusterError(Exception):
    """The cluster could not be found, reached or persuaded: one line naming it and what to do."""


def connect() -> tuple[Client, str]:
    """A client as kubectl would make it, and the API server it talks to (for messages)."""
    try:
        config = KubeConfig.from_env()
        current = config.get()
    except ConfigError as exc:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterError(
            f"no Kubernetes cluster configured ({exc}): point KUBECONFIG at a kubeconfig, or create {where} "
            "(gcloud container clusters get-credentials, kubectl config); in a pod, mount a service account"
        ) from None
    return Client(config, field_manager=FIELD_MANAGER), current.cluster.server if current else "(unknown)"


def _name(m: Manifest) -> str:
    ns = m["metadata"].get("namespace")
    return f"{m['kind']}/{m['metadata']['name']}" + (f" in {ns}" if ns else "")


class Provisioner:
    def __init__(self, client: Client, server: str = "", progress: Callable[[str], None] = print) -> None:
        self._client = client
        self._server = server
        self._progress = progress

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Transport and API failures as one line naming the server, the object and what to check."""
        try:
            yield
        except httpx2.TransportError as exc:
            raise ClusterError(
                f"cannot reach the Kubernetes API server {self._server} ({exc or type(exc).__name__}) to {what}: "
                "is the cluster up, and is it the kubeconfig's current context? (kubectl cluster-info)"
            ) from None
        except ApiError as exc:
            raise ClusterError(
                f"the Kubernetes API server {self._server} refused to {what}: {exc.status.code} "
                f"{exc.status.reason}: {exc.status.message} (the provisioner's rights: packaging/k8s/rbac.yaml)"
            ) from None

    def apply(self, manifests: list[Manifest]) -> None:
        for manifest in manifests:
            with self._talking(f"apply {_name(manifest)}"):
                self._client.apply(codecs.from_dict(manifest), field_manager=FIELD_MANAGER, force=True)
            self._progress(f"applied {_name(manifest)}")

    def wait_ready(self, namespace: str, name: str, timeout_s: float) -> None:
        """Poll until the pod is Running and Ready; one progress line per change of state."""
        started = time.monotonic()
        last = ""
        while True:
            with self._talking(f"read pod {namespace}/{name}"):
                pod = self._client.get(Pod, name, namespace=namespace)
            status: Any = pod.status
            phase = status.phase if status else "Unknown"
            conditions = (status.conditions if status else None) or []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            state = f"pod {namespace}/{name}: {phase}{', ready' if ready else ''}"
            if state != last:
                self._progress(f"{state} ({time.monotonic() - started:.0f}s)")
                last = state
            if phase == "Running" and ready:
                return
            if phase in ("Failed", "Succeeded"):
                raise ClusterError(
                    f"pod {namespace}/{name} ended: {phase} (kubectl -n {namespace} describe pod {name})"
                )
            if time.monotonic() - started > timeout_s:
                raise ClusterError(
                    f"pod {namespace}/{name} not ready after {timeout_s:.0f}s (last: {phase}; "
                    f"kubectl -n {namespace} describe pod {name})"
                )
            time.sleep(POLL_S)

    def delete(self, manifests: list[Manifest]) -> None:
        """Delete in reverse order; what is already gone is fine."""
        for manifest in reversed(manifests):
            resource: Any = type(codecs.from_dict(manifest))  # namespaced or global: lightkube types them apart
            meta = manifest["metadata"]
            with self._talking(f"delete {_name(manifest)}"):
                try:
                    self._client.delete(resource, meta["name"], namespace=meta.get("namespace"))
                except ApiError as exc:
                    if exc.status.code != 404:
                        raise
                    self._progress(f"already gone: {_name(manifest)}")
                    continue
            self._progress(f"deleted {_name(manifest)}")
