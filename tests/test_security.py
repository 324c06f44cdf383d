"""The daemon as the sidecar layout runs it (docs/security.md): on a read-only workspace with its state
elsewhere, and with a health port that tells nothing of the store's credentials or TLS material."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import fakefdb
import pytest
from conftest import DaemonProcess, disk_state, wait_for
from tls_certs import issue

from codi2.trail.replay import fold

Start = Callable[..., DaemonProcess]


def _user_namespaces_work() -> bool:
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, check=False).returncode == 0


def test_daemon_runs_on_a_read_only_workspace_with_its_state_elsewhere(
    tmp_path: Path, workspace: Path, daemon_factory: Start
) -> None:
    """As in the pod: the workspace is a read-only bind mount of a tree someone else writes (inotify
    reports changes made through the other mount), and the state dir comes from CODI2_STATE__DIR."""
    if not _user_namespaces_work():
        pytest.skip("unshare -Urm (user and mount namespaces) not permitted on this machine")
    (workspace / "before.txt").write_text("there before codi2")
    state = tmp_path / "state"
    read_only = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    daemon = daemon_factory(
        wrapper=("unshare", "-Urm", "sh", "-c", read_only, "sh", str(workspace)),
        env={"CODI2_STATE__DIR": str(state)},
    )
    mounts = Path(f"/proc/{daemon.proc.pid}/mountinfo").read_text().splitlines()
    (mount,) = [line.split() for line in mounts if line.split()[4] == str(workspace)]
    assert "ro" in mount[5].split(","), mount  # the daemon really sees the workspace read-only

    (workspace / "src").mkdir()
    (workspace / "src" / "a.py").write_text("print('a')")
    (workspace / "before.txt").write_text("changed")
    expected = {("created", "src"), ("created", "src/a.py"), ("updated", "before.txt")}
    wait_for(lambda: expected <= {(e.action, e.path) for e in daemon.events()})
    (workspace / "src" / "a.py").rename(workspace / "src" / "b.py")
    wait_for(lambda: [e for e in daemon.events() if e.action == "moved" and e.dest_path == "src/b.py"])
    assert daemon.status()["ready"] is True
    assert daemon.terminate() == 0

    assert fold(daemon.events()) == disk_state(workspace)
    assert sorted(p.name for p in workspace.rglob("*")) == ["b.py", "before.txt", "src"]  # nothing of codi2's
    assert (state / "lock").is_file()  # codi2's own files are in its state dir (SQLite keeps the journal in
    # the store's file, here outside the workspace too)


def test_health_port_reveals_no_connection_string_key_or_file_content(tmp_path: Path, fake_libfdb_c: Path) -> None:
    """The user's code shares the pod's network namespace, so it can always read the health port: every
    endpoint, healthy and with the store down, must be free of what the store's credentials are."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    description, cluster_id, coordinator = "codi2prod", "Zq7kX2pSecretId", "127.0.0.1:4689"
    cluster_string = f"{description}:{cluster_id}@{coordinator}"
    cluster_file = secrets / "fdb.cluster"
    cluster_file.write_text(cluster_string + "\n")
    tls = issue(secrets)
    verify_peers = "Check.Valid=1,S.CN=fdb-peer-name"
    data = tmp_path / "fakefdb.sqlite"
    config = tmp_path / "codi2.toml"
    config.write_text(
        f"""
[server]
bind_addr = "127.0.0.1:0"
[foundationdb]
cluster_file = {json.dumps(str(cluster_file))}
cluster_string = {json.dumps(cluster_string)}
transaction_timeout_ms = 200
tls_cert_file = {json.dumps(str(tls.cert))}
tls_key_file = {json.dumps(str(tls.key))}
tls_ca_file = {json.dumps(str(tls.ca))}
tls_verify_peers = {json.dumps(verify_peers)}
[monitoring]
watch_paths = [{json.dumps(str(workspace))}]
[state]
dir = {json.dumps(str(tmp_path / "state"))}
[batching]
max_delay_ms = 20
[logging]
format = "json"
"""
    )
    env = {**fakefdb.child_env(fake_libfdb_c, data), "FDB_CLUSTER_FILE": str(cluster_file)}
    daemon = DaemonProcess(config, tmp_path / "unused.db", env)
    try:
        pages = [daemon.get(path) for path in ("/status", "/metrics", "/livez?verbose", "/readyz?verbose")]
        Path(f"{data}.down").touch()  # an outage: the store's error reaches /status and the metrics
        (workspace / "during-outage.txt").write_text("x")
        wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
        pages += [daemon.get("/status"), daemon.get("/metrics")]
        Path(f"{data}.down").unlink()
        wait_for(lambda: daemon.status()["spool"]["events"] == 0)
        pages += [daemon.get("/status"), daemon.get("/metrics")]
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    assert all(code == 200 for code, _ in pages), [code for code, _ in pages]
    assert json.loads(pages[4][1])["store"]["error_code"] == "fdb_1031"
    pem_lines = [line for f in (tls.cert, tls.key, tls.ca) for line in f.read_text().splitlines() if len(line) >= 32]
    needles = [cluster_string, description, cluster_id, coordinator, str(secrets), str(data), verify_peers, *pem_lines]
    needles += ["tls.crt", "tls.key", "ca.crt", "fdb.cluster"]
    for _, body in pages:
        assert not [needle for needle in needles if needle in body], body
