"""Provisioning: rendered manifests validate strictly, ids are checked never mangled, apply is
idempotent server-side apply against a local API double, and the checked-in manifests match."""

from __future__ import annotations

import base64
import json
import os
import socket
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
from tls_certs import DAY, NOW, TlsFiles, issue

from codi2 import __version__
from codi2.config import load_settings
from codi2.provisioning import spec as spec_module
from codi2.provisioning.apply import ClusterError, Provisioner
from codi2.provisioning.render import render, render_rbac
from codi2.provisioning.spec import DNS_LABEL, MAX_ID, WorkspaceSpec, read_key_file
from codi2.trail.chain import KEY_MAX_BYTES, KEY_MIN_BYTES, load_key

REPO = Path(__file__).resolve().parent.parent
CONFIG = (REPO / "config" / "codi2.toml").read_text()
K8S_VERSION = kubernetes_validate.utils.latest_version()


REGISTRY = "registry.example/coditect"


def spec(**kw: object) -> WorkspaceSpec:
    fields: dict[str, object] = {
        "user_id": "alice",
        "tenant_id": "acme",
        "codi2_config": CONFIG,
        "registry": REGISTRY,
        **kw,
    }
    return WorkspaceSpec(**fields)  # type: ignore[arg-type]


def test_the_grace_period_outlasts_the_configured_shutdown_deadline() -> None:
    config = CONFIG.replace("[server]\n", "[server]\nshutdown_timeout_s = 120.5\n", 1)
    assert config != CONFIG
    pod = render(spec(codi2_config=config))[-1]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 121 + 40


def validate(manifests: list[dict]) -> None:
    for manifest in manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_rendered_workspace_validates_strictly_and_is_production_grade() -> None:
    manifests = render(spec(session_id="s-1", storage_class="standard-rwo", labels={"team": "blue"}))
    validate(manifests)
    kinds = [m["kind"] for m in manifests]
    assert kinds == [
        "Namespace",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
        "Pod",
    ]
    pod = manifests[-1]
    codi2 = _container(pod, "codi2")
    assert codi2["args"] == ["--config", "/etc/codi2/codi2.toml", "--user-id", "alice", "--tenant-id", "acme"]
    assert {e["name"]: e["value"] for e in codi2["env"]} == {
        "USER_ID": "alice",
        "TENANT_ID": "acme",
        "SESSION_ID": "s-1",
        "FDB_CLUSTER_FILE": "/etc/foundationdb/fdb.cluster",
        "CODI2_STATE__DIR": "/var/lib/codi2",
    }
    assert codi2["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert codi2["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = codi2["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert pod["spec"]["terminationGracePeriodSeconds"] == 60  # the daemon's drain (20 s) and the user's container
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for container in _containers(pod):
        assert container["resources"]["limits"] and container["resources"]["requests"]
    for manifest in manifests:
        assert manifest["metadata"]["labels"]["coditect.ai/user-workspace"] == "alice"
        assert manifest["metadata"]["labels"]["coditect.ai/tenant"] == "acme"
        assert manifest["metadata"]["labels"]["team"] == "blue"
    claims = {m["metadata"]["name"]: m["spec"] for m in manifests if m["kind"] == "PersistentVolumeClaim"}
    assert claims["user-workspace-alice"]["resources"]["requests"]["storage"] == "50Gi"
    assert claims["codi2-state"]["resources"]["requests"]["storage"] == "2Gi"
    assert {c["storageClassName"] for c in claims.values()} == {"standard-rwo"}
    assert _secret_files(manifests[4]) == {"fdb.cluster": b"coditect:production@10.128.0.8:4500\n"}
    assert manifests[3]["data"]["codi2.toml"] == CONFIG


def _containers(pod: dict) -> list[dict]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def _container(pod: dict, name: str) -> dict:
    return next(c for c in _containers(pod) if c["name"] == name)


def _secret_files(secret: dict) -> dict[str, bytes]:
    return {name: base64.b64decode(value) for name, value in secret["data"].items()}


def _effective(pod: dict, container: dict, key: str) -> object:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    return container.get("securityContext", {}).get(key, pod["spec"]["securityContext"].get(key))


def _volume_of(container: dict, path: str) -> str:
    """The volume a container sees `path` through (the mount with the longest matching mountPath)."""
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no volume of {container['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))["name"]


def _tls_spec(directory: Path, **kw: object) -> WorkspaceSpec:
    tls = issue(directory)
    return spec(fdb_tls_cert=tls.cert.read_text(), fdb_tls_key=tls.key.read_text(), fdb_tls_ca=tls.ca.read_text(), **kw)


def test_sidecar_keeps_the_store_credentials_and_codi2_state_out_of_the_users_container(tmp_path: Path) -> None:
    """What the issue demands of the pod, read off the rendered objects rather than restated from the
    renderer: every volume that can reach the store's Secret or codi2's state dir is mounted into codi2
    alone, and the user's container runs its image's own command under another uid."""
    manifests = render(_tls_spec(tmp_path, session_id="s-1"))
    validate(manifests)
    pod = next(m for m in manifests if m["kind"] == "Pod")
    secret = next(m for m in manifests if m["kind"] == "Secret")
    codi2 = _container(pod, "codi2")
    user = _container(pod, "workspace")
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["codi2"]
    assert codi2["restartPolicy"] == "Always"  # a native sidecar: up before the user's container, stops after it
    assert [c["name"] for c in pod["spec"]["containers"]] == ["workspace"]
    assert "command" not in user and "args" not in user  # the workspace image's own command

    env = {e["name"]: e["value"] for e in codi2["env"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim_of = {
        name: v["persistentVolumeClaim"]["claimName"] for name, v in volumes.items() if "persistentVolumeClaim" in v
    }
    private = {
        _volume_of(codi2, env["FDB_CLUSTER_FILE"]),
        _volume_of(codi2, env["CODI2_STATE__DIR"]),
        *(name for name, v in volumes.items() if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]),
    }
    # A claim mounted anywhere, with any subPath, gives the whole claim: compare claims, not volume names.
    private_claims = {claim_of[name] for name in private if name in claim_of}
    assert private_claims == {"codi2-state"}
    for container in _containers(pod):
        if container is codi2:
            continue
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        assert not mounted & private, container["name"]
        assert not {claim_of[name] for name in mounted if name in claim_of} & private_claims, container["name"]
        assert "envFrom" not in container
        assert not any("valueFrom" in e for e in container.get("env", []))
    assert {m["name"] for m in user["volumeMounts"]} == {"workspace"}

    workspace_mount = next(m for m in codi2["volumeMounts"] if m["mountPath"] == "/workspace")
    assert workspace_mount["readOnly"] is True
    assert _volume_of(user, "/workspace") == workspace_mount["name"]

    assert _effective(pod, codi2, "runAsUser") != _effective(pod, user, "runAsUser")
    assert _effective(pod, codi2, "runAsNonRoot") is True and _effective(pod, user, "runAsNonRoot") is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert not pod["spec"].get("shareProcessNamespace")
    assert _effective(pod, codi2, "readOnlyRootFilesystem") is True
    assert _effective(pod, codi2, "allowPrivilegeEscalation") is False
    assert _effective(pod, codi2, "capabilities") == {"drop": ["ALL"]}
    assert _effective(pod, codi2, "seccompProfile") == {"type": "RuntimeDefault"}
    assert "privileged" not in codi2["securityContext"]

    assert codi2["ports"] == [{"name": "health", "containerPort": 8765, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert codi2[probe]["httpGet"]["port"] == "health"
        assert not any(probe in c for c in _containers(pod) if c is not codi2)


def test_tls_material_is_in_the_secret_where_codi2_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = render(_tls_spec(tmp_path))
    validate(manifests)
    files = _secret_files(next(m for m in manifests if m["kind"] == "Secret"))
    assert files == {
        "fdb.cluster": b"coditect:production@10.128.0.8:4500\n",
        "tls.crt": (tmp_path / "tls.crt").read_bytes(),
        "tls.key": (tmp_path / "tls.key").read_bytes(),
        "ca.crt": (tmp_path / "ca.crt").read_bytes(),
    }
    pod = manifests[-1]
    codi2 = _container(pod, "codi2")
    for variable in codi2["env"]:  # as the kubelet sets them: codi2's config reads the Secret's files
        monkeypatch.setenv(variable["name"], variable["value"])
    fdb = load_settings(None).foundationdb
    secret_volume = _volume_of(codi2, "/etc/foundationdb/fdb.cluster")
    for path in (fdb.tls_cert_file, fdb.tls_key_file, fdb.tls_ca_file):
        assert path is not None and path.name in files
        assert _volume_of(codi2, str(path)) == secret_volume


def test_network_policy_admits_the_health_port_only_from_the_configured_namespaces() -> None:
    manifests = render(spec(platform_namespaces=["platform"], monitoring_namespaces=["prom", "gmp-system"]))
    validate(manifests)
    pod = next(m for m in manifests if m["kind"] == "Pod")
    (policy,) = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == pod["metadata"]["namespace"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8765}]
    (peer,) = rule["from"]
    assert peer == {
        "namespaceSelector": {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["platform", "prom", "gmp-system"]}
            ]
        }
    }
    with pytest.raises(ValidationError, match="not a Kubernetes namespace name"):
        spec(monitoring_namespaces=["Monitoring"])


def test_entrypoint_layout_is_one_container_running_codi2() -> None:
    """Kept for local use: codi2 is the container's command and keeps its state in /workspace/.codi2, so
    anything else run in that container can read the store's material (docs/security.md)."""
    manifests = render(spec(layout="entrypoint"))
    validate(manifests)
    assert "codi2-state" not in [m["metadata"]["name"] for m in manifests]
    pod = manifests[-1]
    assert "initContainers" not in pod["spec"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["/usr/local/bin/codi2"]
    assert container["image"] == f"{REGISTRY}/codi2-workspace:{__version__}"  # Dockerfile.workspace's target
    assert "CODI2_STATE__DIR" not in {e["name"] for e in container["env"]}
    assert {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]} == {
        "/workspace": False,
        "/etc/codi2": True,
        "/etc/foundationdb": True,
    }
    assert pod["spec"]["automountServiceAccountToken"] is False


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
        assert server.kube.changes == 7
        patches = [r for r in server.kube.requests if r.method == "PATCH"]
        assert [r.path for r in patches] == [
            "/api/v1/namespaces/user-alice",
            "/api/v1/namespaces/user-alice/persistentvolumeclaims/user-workspace-alice",
            "/api/v1/namespaces/user-alice/persistentvolumeclaims/codi2-state",
            "/api/v1/namespaces/user-alice/configmaps/codi2-config",
            "/api/v1/namespaces/user-alice/secrets/codi2-fdb",
            "/apis/networking.k8s.io/v1/namespaces/user-alice/networkpolicies/codi2-health",
            "/api/v1/namespaces/user-alice/pods/workspace",
        ]
        assert all(r.content_type == "application/apply-patch+yaml" for r in patches)
        assert all(r.query.get("fieldManager") == ["codi2"] and r.query.get("force") == ["true"] for r in patches)
        provisioner.apply(manifests)
        assert server.kube.changes == 7  # the second apply changed nothing
        provisioner.apply(render(spec(image="registry.example/workspace:2")))
        assert server.kube.changes == 8  # a changed spec changes exactly the pod
        provisioner.wait_ready("user-alice", "workspace", timeout_s=30)
    assert "applied Pod/workspace in user-alice" in lines
    states = [line.rsplit(" (", 1)[0] for line in lines if line.startswith("pod ")]
    assert states == ["pod user-alice/workspace: Pending", "pod user-alice/workspace: Running, ready"]


def test_wait_ready_times_out_with_the_last_state() -> None:
    with FakeKubeServer() as server:
        server.kube.pod_gets_before_ready = 10**9
        provisioner = Provisioner(_client(server), progress=lambda _: None)
        provisioner.apply(render(spec()))
        with pytest.raises(ClusterError, match="not ready after 0s"):
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


def _cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO, defaults: bool = True
) -> subprocess.CompletedProcess[str]:
    """`codi2 provision ARGS`; render, apply and delete get the seed config and a registry first, which
    the test's own flags override."""
    if defaults and args[0] in ("render", "apply", "delete"):
        args = (args[0], "--config", str(REPO / "config" / "codi2.toml"), "--registry", REGISTRY, *args[1:])
    return subprocess.run(
        [sys.executable, "-m", "codi2", "provision", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
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


def _tls_flags(tls: TlsFiles) -> tuple[str, ...]:
    return ("--fdb-tls-cert", str(tls.cert), "--fdb-tls-key", str(tls.key), "--fdb-tls-ca", str(tls.ca))


def test_cli_render_output_and_errors(tmp_path: Path) -> None:
    rendered = _cli(
        "render",
        *("--user-id", "carol", "--tenant-id", "acme", "--storage", "20Gi", "--state-storage", "5Gi"),
        *("--codi2-image", "registry.example/codi2:7", "--platform-namespace", "ide"),
        *("--monitoring-namespace", "prom", "--monitoring-namespace", "gmp-system"),
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    validate(docs)
    assert [d["spec"]["resources"]["requests"]["storage"] for d in docs[1:3]] == ["20Gi", "5Gi"]
    assert docs[-1]["spec"]["initContainers"][0]["image"] == "registry.example/codi2:7"
    (rule,) = docs[-2]["spec"]["ingress"]
    assert rule["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["ide", "prom", "gmp-system"]
    local = list(
        yaml.safe_load_all(_cli("render", "--user-id", "carol", "--tenant-id", "a", "--layout", "entrypoint").stdout)
    )
    assert "initContainers" not in local[-1]["spec"]
    tls = issue(tmp_path / "tls")
    expired = issue(tmp_path / "expired", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    secure = _cli("render", "--user-id", "carol", "--tenant-id", "a", *_tls_flags(tls))
    assert secure.returncode == 0, secure.stderr
    secret = next(d for d in yaml.safe_load_all(secure.stdout) if d["kind"] == "Secret")
    assert set(secret["data"]) == {"fdb.cluster", "tls.crt", "tls.key", "ca.crt"}
    for args, message in (
        (("--user-id", "Carol.Smith"), "codi2: --user-id: 'Carol.Smith' cannot be part of a Kubernetes name"),
        (("--user-id", "carol", "--platform-namespace", "IDE"), "codi2: --platform-namespace: 'IDE' is not a"),
        (("--user-id", "carol", "--state-storage", "lots"), "codi2: --state-storage: 'lots' is not a Kubernetes"),
        (("--user-id", "carol", *_tls_flags(expired)), f"codi2: certificate {expired.cert}: CN=codi2 expired on"),
        (
            ("--user-id", "carol", "--fdb-tls-cert", str(tls.cert)),
            "codi2: --fdb-tls-cert and --fdb-tls-key go together",
        ),
    ):
        bad = _cli("render", "--tenant-id", "acme", *args)
        assert bad.returncode == 2
        assert bad.stderr.startswith(message), bad.stderr
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


def test_cluster_errors_are_one_line_naming_the_server_or_the_kubeconfig(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with FakeKubeServer() as server:
        config = server.config()
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    ids = ("--user-id", "bob", "--tenant-id", "acme")
    down = _cli("apply", *ids, env={"KUBECONFIG": str(kubeconfig)})
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.startswith(
        f"codi2: cannot reach the Kubernetes API server http://127.0.0.1:{port} ("
    ) and down.stderr.rstrip().endswith(
        "to apply Namespace/user-bob: is the cluster up, and is it the "
        "kubeconfig's current context? (kubectl cluster-info)"
    ), down.stderr
    assert down.stderr.count("\n") == 1
    home = tmp_path / "home"
    home.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith(("KUBE", "HOME"))}
    none = subprocess.run(
        [
            sys.executable,
            "-m",
            "codi2",
            "provision",
            "delete",
            *ids,
            "--registry",
            REGISTRY,
            "--fdb-cluster-string",
            "a:b@10.0.0.1:4500",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**env, "HOME": str(home)},
    )
    assert none.returncode == 1 and none.stderr.count("\n") == 1, none.stderr
    assert none.stderr.startswith(
        "codi2: no Kubernetes cluster configured (Configuration file ~/.kube/config not found)"
    )
    assert "create ~/.kube/config" in none.stderr


def test_render_works_anywhere_with_defaults_and_pins_the_images_to_this_release(tmp_path: Path) -> None:
    ids = ("--user-id", "dave", "--tenant-id", "acme")
    anywhere = _cli(
        "render",
        *ids,
        "--registry",
        REGISTRY,
        "--fdb-cluster-string",
        "a:b@10.0.0.1:4500",
        cwd=tmp_path,
        defaults=False,
    )
    assert anywhere.returncode == 0, anywhere.stderr
    docs = list(yaml.safe_load_all(anywhere.stdout))
    validate(docs)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["codi2.toml"]
    settings = tmp_path / "codi2.toml"
    settings.write_text(config)
    assert load_settings(settings).backend == "fdb"
    pod = docs[-1]["spec"]
    images = [c["image"] for c in [*pod["initContainers"], *pod["containers"]]]
    assert images == [f"{REGISTRY}/codi2:{__version__}", f"{REGISTRY}/t2-workspace-pod:{__version__}"]
    assert "latest" not in anywhere.stdout
    tagged = _cli("render", *ids, "--tag", "sha-1234")
    assert [c["image"] for c in list(yaml.safe_load_all(tagged.stdout))[-1]["spec"]["initContainers"]] == [
        f"{REGISTRY}/codi2:sha-1234"
    ]
    no_registry = _cli("render", *ids, cwd=tmp_path, defaults=False)
    assert no_registry.returncode == 2 and no_registry.stderr == (
        "codi2: --registry: no image registry: give one (e.g. gcr.io/PROJECT), or name every image in full"
        " (--image and --codi2-image)\n"
    )
    no_cluster = _cli("render", *ids, "--registry", REGISTRY, cwd=tmp_path, defaults=False)
    assert no_cluster.returncode == 2
    assert no_cluster.stderr == (
        "codi2: no FDB cluster string: give --fdb-cluster-string, or a --config that sets [foundationdb] "
        "cluster_string\n"
    )


def test_integrity_key_is_a_secret_of_its_own_mounted_read_only_into_codi2_alone(tmp_path: Path) -> None:
    """The trail's HMAC key: its own Secret (rotating it leaves the store's alone), whose content is the key
    file byte for byte, mounted read-only into codi2 and no other container, where codi2's env points."""
    key_file = tmp_path / "key"
    key_file.write_bytes(os.urandom(48) + b"\n")
    plain = render(spec())
    manifests = render(spec(integrity_key=key_file.read_bytes()))
    validate(manifests)
    assert [m["metadata"]["name"] for m in manifests if m["kind"] == "Secret"] == ["codi2-fdb", "codi2-integrity"]
    assert [m for m in manifests if m["kind"] != "Pod" and m["metadata"]["name"] != "codi2-integrity"] == plain[:-1]
    secret = next(m for m in manifests if m["metadata"]["name"] == "codi2-integrity")
    assert _secret_files(secret) == {"key": key_file.read_bytes()}

    pod = manifests[-1]
    codi2 = _container(pod, "codi2")
    volumes = [v for v in pod["spec"]["volumes"] if v.get("secret", {}).get("secretName") == "codi2-integrity"]
    assert [v["secret"]["defaultMode"] for v in volumes] == [0o440]  # as the store's Secret
    (volume,) = (v["name"] for v in volumes)
    for container in _containers(pod):
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
        assert mounts == (
            [{"name": volume, "mountPath": "/etc/codi2-integrity", "readOnly": True}] if container is codi2 else []
        )
    env = {e["name"]: e["value"] for e in codi2["env"]}
    assert env["CODI2_INTEGRITY__KEY_FILE"] == "/etc/codi2-integrity/key"
    assert _volume_of(codi2, env["CODI2_INTEGRITY__KEY_FILE"]) == volume
    # What the daemon reads from the mounted file is the key the operator gave (same id, same secret).
    mounted = tmp_path / "mounted"
    mounted.write_bytes(_secret_files(secret)["key"])
    assert load_key(mounted) == load_key(key_file)
    assert "integrity_key" not in repr(spec(integrity_key=key_file.read_bytes()))
    with pytest.raises(ValidationError) as refused:
        spec(integrity_key=b"short key, never echoed")
    assert "never echoed" not in str(refused.value)


@pytest.mark.parametrize(
    "content", [b"k" * 31, b"k" * 31 + b"\r\n", b"k" * 32, b"k" * 32 + b"\n", b"k" * 4096, b"k" * 4097]
)
def test_the_provisioner_refuses_exactly_the_keys_the_daemon_refuses(tmp_path: Path, content: bytes) -> None:
    assert (spec_module.KEY_MIN_BYTES, spec_module.KEY_MAX_BYTES) == (KEY_MIN_BYTES, KEY_MAX_BYTES)
    path = tmp_path / "key"
    path.write_bytes(content)
    try:
        load_key(path)
        daemon_accepts = True
    except ValueError:
        daemon_accepts = False
    try:
        spec(integrity_key=read_key_file(path))
        provisioner_accepts = True
    except ValidationError:
        provisioner_accepts = False
    assert provisioner_accepts == daemon_accepts


def test_cli_integrity_key_is_checked_in_one_line_and_never_printed(tmp_path: Path) -> None:
    ids = ("--user-id", "carol", "--tenant-id", "acme")
    good = tmp_path / "key"
    good.write_bytes(os.urandom(31) + b"=")  # never ending in CR or LF, which a key reader strips
    rendered = _cli("render", *ids, "--integrity-key-file", str(good))
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    validate(docs)
    assert _secret_files(next(d for d in docs if d["metadata"]["name"] == "codi2-integrity")) == {
        "key": good.read_bytes()
    }
    short, long, fifo = tmp_path / "short", tmp_path / "long", tmp_path / "fifo"
    short.write_bytes(b"s" * 31 + b"\n")
    long.write_bytes(b"l" * 4097)
    os.mkfifo(fifo)  # opened without blocking, refused by type: a FIFO must not hang the provisioner
    for path, reason in (
        (short, "holds 31 bytes; a key needs at least 32"),
        (long, "holds more than 4096 bytes"),
        (fifo, "not a regular file"),
        (tmp_path, "not a regular file"),
        (tmp_path / "missing", "cannot read it: No such file or directory"),
    ):
        bad = _cli("render", *ids, "--integrity-key-file", str(path))
        assert bad.returncode == 2, (path, bad.stderr)
        assert bad.stderr.startswith(f"codi2: --integrity-key-file {path}: {reason}"), bad.stderr
        assert bad.stderr.count("\n") == 1 and not bad.stdout
        assert b"s" * 31 not in bad.stderr.encode() and b"l" * 32 not in bad.stderr.encode()
    local = _cli("render", *ids, "--layout", "entrypoint", "--integrity-key-file", str(good))
    assert local.returncode == 2
    assert local.stderr.startswith(f"codi2: --integrity-key-file {good}: the entrypoint layout has no container")
    assert local.stderr.count("\n") == 1


def test_a_config_naming_a_key_file_needs_the_key(tmp_path: Path) -> None:
    """Else the pod's daemon would fail to start on a file that is not there: said in one line instead."""
    config = tmp_path / "codi2.toml"
    config.write_text(CONFIG + '\n[integrity]\nkey_file = "/etc/codi2-integrity/key"\n')
    with pytest.raises(ValueError, match=r"\[integrity\] key_file is '/etc/codi2-integrity/key', but no key"):
        render(spec(codi2_config=config.read_text()))
    bad = _cli("render", "--user-id", "carol", "--tenant-id", "acme", "--config", str(config))
    assert bad.returncode == 2
    assert bad.stderr.startswith(f"codi2: --config {config}: [integrity] key_file is '/etc/codi2-integrity/key'")
    assert bad.stderr.count("\n") == 1
    key = tmp_path / "key"
    key.write_bytes(os.urandom(31) + b"=")
    good = _cli(
        "render", "--user-id", "carol", "--tenant-id", "acme", "--config", str(config), "--integrity-key-file", str(key)
    )
    assert good.returncode == 0, good.stderr
    validate(list(yaml.safe_load_all(good.stdout)))
