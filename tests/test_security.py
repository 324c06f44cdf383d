"""The daemon as the sidecar layout runs it (docs/security.md): on a read-only workspace with its state
elsewhere, and with a health port that tells nothing of the store's credentials."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess, wait_for

Start = Callable[..., DaemonProcess]
FAKE_LIBFDB = Path(__file__).resolve().parent.parent.parent / "shared" / "fakelibfdb"


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
    wait_for(lambda: len(daemon.events()) == 3)
    (workspace / "src" / "a.py").rename(workspace / "src" / "b.py")
    wait_for(lambda: len(daemon.events()) == 4)
    assert daemon.status()["ready"] is True
    assert daemon.terminate() == 0

    assert sorted((e.action, e.path, e.dest_path) for e in daemon.events()) == [
        ("created", "src", None),
        ("created", "src/a.py", None),
        ("moved", "src/a.py", "src/b.py"),
        ("updated", "before.txt", None),
    ]
    assert sorted(p.name for p in workspace.rglob("*")) == ["b.py", "before.txt", "src"]  # nothing of codi2's
    assert (state / "spool").is_dir() and (state / "index.db").is_file()


@pytest.fixture(scope="module")
def fake_libfdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fake libfdb_c of ../shared/fakelibfdb, built for this module; the real `fdb` bindings load it."""
    if not (FAKE_LIBFDB / "Makefile").exists() or shutil.which("gcc") is None:
        pytest.skip("needs ../shared/fakelibfdb and gcc to build the fake libfdb_c")
    build = tmp_path_factory.mktemp("fakelibfdb")
    made = subprocess.run(["make", "-C", str(FAKE_LIBFDB), f"BUILD={build}"], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"the fake libfdb_c did not build: {made.stderr.strip()[-300:]}")
    yield build


def test_health_port_reveals_no_connection_string_key_or_file_content(tmp_path: Path, fake_libfdb: Path) -> None:
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
    env = {
        "LD_LIBRARY_PATH": f"{fake_libfdb}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        "FDB_CLUSTER_FILE": str(cluster_file),
        "FAKEFDB_DATA": str(data),
    }
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
    assert json.loads(pages[4][1])["store"]["error_code"] == "transaction_timed_out"
    needles = [cluster_string, description, cluster_id, coordinator, str(secrets), str(data)]
    for _, body in pages:
        assert not [needle for needle in needles if needle in body], body
