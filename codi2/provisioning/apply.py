"""Create, update and delete a workspace through the Kubernetes API (lightkube).

Every object is sent as a server-side apply with field manager `codi2`, so applying the same spec twice
changes nothing and a changed spec updates exactly the fields codi2 owns. The client is configured as
kubectl would be: in-cluster service account first, then `KUBECONFIG` or `~/.kube/config`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lightkube import ApiError, Client, codecs
from lightkube.config.kubeconfig import KubeConfig
from lightkube.resources.core_v1 import Pod

from codi2.provisioning.render import Manifest

FIELD_MANAGER = "codi2"
POLL_S = 1.0


def connect() -> Client:
    return Client(KubeConfig.from_env(), field_manager=FIELD_MANAGER)


def _name(m: Manifest) -> str:
    ns = m["metadata"].get("namespace")
    return f"{m['kind']}/{m['metadata']['name']}" + (f" in {ns}" if ns else "")


class Provisioner:
    def __init__(self, client: Client, progress: Callable[[str], None] = print) -> None:
        self._client = client
        self._progress = progress

    def apply(self, manifests: list[Manifest]) -> None:
        for manifest in manifests:
            self._client.apply(codecs.from_dict(manifest), field_manager=FIELD_MANAGER, force=True)
            self._progress(f"applied {_name(manifest)}")

    def wait_ready(self, namespace: str, name: str, timeout_s: float) -> None:
        """Poll until the pod is Running and Ready; one progress line per change of state."""
        started = time.monotonic()
        last = ""
        while True:
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
                raise RuntimeError(f"pod {namespace}/{name} ended: {phase}")
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"pod {namespace}/{name} not ready after {timeout_s:.0f}s (last: {phase})")
            time.sleep(POLL_S)

    def delete(self, manifests: list[Manifest]) -> None:
        """Delete in reverse order; what is already gone is fine."""
        for manifest in reversed(manifests):
            resource = type(codecs.from_dict(manifest))
            meta = manifest["metadata"]
            try:
                self._client.delete(resource, meta["name"], namespace=meta.get("namespace"))
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                self._progress(f"already gone: {_name(manifest)}")
                continue
            self._progress(f"deleted {_name(manifest)}")
