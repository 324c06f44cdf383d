"""Provisioning: rendered manifests validate strictly, ids are checked never mangled, apply is
idempotent server-side apply against a local API double, and the checked-in manifests match."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from k8s_double import FakeKubeServer
from lightkube import Client
from lightkube.config.kubeconfig import KubeConfig
from pydantic import ValidationError

from codi2.provisioning.apply import Provisioner
from codi2.provisioning.render import render, render_rbac
from codi2.provisioning.spec import DNS_LABEL, MAX_ID, WorkspaceSpec

REPO = Path(__file__).resolve().parent.parent
CONFIG = (REPO / "config" / "codi2.toml").read_text()
K8S_VERSION = kubernetes_validate.utils.latest_version()


def spec(**kw: object) -> WorkspaceSpec:
    fields: dict[str, object] = {"user_id": "alice", "tenant_id": "acme", "codi2_config": CONFIG, **kw}
    return WorkspaceSpec(**fields)  # type: ignore[arg-type]


def validate(manifests: list[dict]) -> None:
    for manifest in manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_rendered_workspace_validates_strictly_and_is_production_grade() -> None:
    manifests = render(spec(session_id="s-1", storage_class="standard-rwo", labels={"team": "blue"}))
    validate(manifests)
    kinds = [m["kind"] for m in manifests]
    assert kinds == ["Namespace", "PersistentVolumeClaim", "ConfigMap", "ConfigMap", "Pod"]
    pod = manifests[-1]
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["--config", "/etc/codi2/codi2.toml", "--user-id", "alice", "--tenant-id", "acme"]
    assert {e["name"]: e["value"] for e in container["env"]} == {
        "USER_ID": "alice",
        "TENANT_ID": "acme",
        "SESSION_ID": "s-1",
        "FDB_CLUSTER_FILE": "/etc/foundationdb/fdb.cluster",
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert pod["spec"]["terminationGracePeriodSeconds"] > 25  # the daemon's drain and flush
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["limits"] and container["resources"]["requests"]
    for manifest in manifests:
        assert manifest["metadata"]["labels"]["coditect.ai/user-workspace"] == "alice"
        assert manifest["metadata"]["labels"]["coditect.ai/tenant"] == "acme"
        assert manifest["metadata"]["labels"]["team"] == "blue"
    assert manifests[3]["data"]["fdb.cluster"] == "coditect:production@10.128.0.8:4500\n"
    assert manifests[2]["data"]["codi2.toml"] == CONFIG


def test_rbac_validates() -> None:
    validate(render_rbac())


@given(
    st.from_regex(DNS_LABEL, fullmatch=True).filter(lambda s: len(s) <= MAX_ID),
    st.from_regex(DNS_LABEL, fullmatch=True).filter(lambda s: len(s) <= MAX_ID),
)
def test_any_valid_id_renders_valid_manifests(user: str, tenant: str) -> None:
    manifests = render(spec(user_id=user, tenant_id=tenant))
    validate(manifests)
    assert manifests[0]["metadata"]["name"] == f"user-{user}"
    assert manifests[1]["metadata"]["name"] == f"user-workspace-{user}"


@given(st.text(min_size=1, max_size=80).filter(lambda s: not DNS_LABEL.match(s) or len(s) > MAX_ID))
def test_any_invalid_id_is_refused_never_mangled(user: str) -> None:
    with pytest.raises(ValidationError, match="user_id"):
        spec(user_id=user)


def test_bad_quantity_and_missing_cluster_string_are_refused() -> None:
    with pytest.raises(ValidationError, match="not a Kubernetes quantity"):
        spec(storage_size="fifty gigs")
    with pytest.raises(ValueError, match="no FDB cluster string"):
        spec(codi2_config="[server]\n").cluster_string()


def _client(server: FakeKubeServer) -> Client:
    return Client(KubeConfig.from_dict(server.config()), field_manager="codi2")


def test_apply_is_server_side_apply_and_idempotent() -> None:
    manifests = render(spec())
    lines: list[str] = []
    with FakeKubeServer() as server:
        provisioner = Provisioner(_client(server), progress=lines.append)
        provisioner.apply(manifests)
        assert server.kube.changes == 5
        patches = [r for r in server.kube.requests if r.method == "PATCH"]
        assert [r.path for r in patches] == [
            "/api/v1/namespaces/user-alice",
            "/api/v1/namespaces/user-alice/persistentvolumeclaims/user-workspace-alice",
            "/api/v1/namespaces/user-alice/configmaps/codi2-config",
            "/api/v1/namespaces/user-alice/configmaps/fdb-cluster-config",
            "/api/v1/namespaces/user-alice/pods/workspace",
        ]
        assert all(r.content_type == "application/apply-patch+yaml" for r in patches)
        assert all(r.query.get("fieldManager") == ["codi2"] and r.query.get("force") == ["true"] for r in patches)
        provisioner.apply(manifests)
        assert server.kube.changes == 5  # the second apply changed nothing
        provisioner.apply(render(spec(image="registry.example/workspace:2")))
        assert server.kube.changes == 6  # a changed spec changes exactly the pod
        provisioner.wait_ready("user-alice", "workspace", timeout_s=30)
    assert "applied Pod/workspace in user-alice" in lines
    states = [line.rsplit(" (", 1)[0] for line in lines if line.startswith("pod ")]
    assert states == ["pod user-alice/workspace: Pending", "pod user-alice/workspace: Running, ready"]


def test_wait_ready_times_out_with_the_last_state() -> None:
    with FakeKubeServer() as server:
        server.kube.pod_gets_before_ready = 10**9
        provisioner = Provisioner(_client(server), progress=lambda _: None)
        provisioner.apply(render(spec()))
        with pytest.raises(TimeoutError, match="not ready after 0s"):
            provisioner.wait_ready("user-alice", "workspace", timeout_s=0)


def test_delete_removes_everything_in_reverse_and_tolerates_gone_objects() -> None:
    manifests = render(spec())
    lines: list[str] = []
    with FakeKubeServer() as server:
        provisioner = Provisioner(_client(server), progress=lines.append)
        provisioner.apply(manifests)
        provisioner.delete(manifests)
        assert server.kube.objects == {}
        deletes = [r.path for r in server.kube.requests if r.method == "DELETE"]
        assert deletes[0].endswith("/pods/workspace") and deletes[-1] == "/api/v1/namespaces/user-alice"
        provisioner.delete(manifests)
    assert lines[-1] == "already gone: Namespace/user-alice"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codi2", "provision", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_cli_apply_and_delete_through_kubeconfig(tmp_path: Path) -> None:
    with FakeKubeServer() as server:
        env = {"KUBECONFIG": str(server.kubeconfig(tmp_path / "kubeconfig"))}
        ids = ["--user-id", "bob", "--tenant-id", "acme"]
        applied = _cli("apply", *ids, "--wait-timeout", "30", env=env)
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.splitlines()[-1].startswith("pod user-bob/workspace: Running, ready")
        deleted = _cli("delete", *ids, env=env)
        assert deleted.returncode == 0, deleted.stderr
        assert server.kube.objects == {}


def test_cli_render_output_and_errors() -> None:
    rendered = _cli("render", "--user-id", "carol", "--tenant-id", "acme", "--storage", "20Gi")
    assert rendered.returncode == 0
    docs = list(yaml.safe_load_all(rendered.stdout))
    validate(docs)
    assert docs[1]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    bad = _cli("render", "--user-id", "Carol.Smith", "--tenant-id", "acme")
    assert bad.returncode == 2
    assert bad.stderr.startswith("codi2: --user-id: 'Carol.Smith' cannot be part of a Kubernetes name")
    assert bad.stderr.count("\n") == 1


def test_checked_in_manifests_match_the_renderer(tmp_path: Path) -> None:
    """packaging/k8s is generated by `make manifests`; this fails when it drifts from the renderer."""
    out = tmp_path / "k8s"
    for args in (
        [
            "render",
            "--user-id",
            "example-user",
            "--tenant-id",
            "example-tenant",
            "--session-id",
            "example-session",
            "--output-dir",
            str(out),
        ],
        ["rbac", "--output-dir", str(out)],
    ):
        assert _cli(*args).returncode == 0
    checked_in = REPO / "packaging" / "k8s"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in checked_in.glob("*.yaml"))
    for path in out.iterdir():
        assert (checked_in / path.name).read_text() == path.read_text(), f"{path.name} drifted: run make manifests"
