"""`codi2 test`: each step reported on its own line, a failing step with a hint, exit 0 or 1."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import ModuleType

import fakefdb
import pytest
from conftest import run_codi2

from codi2.cli.checks import PROBE_TENANT
from codi2.stores.fdb.client import parse_cluster_file
from codi2.stores.fdb.sink import FdbSink


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_codi2("test", *args, env=env)


def test_sqlite_store_passes_every_step(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(tmp_path / "a.db"))}\n')
    result = _run("--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("PASS")]
    assert names == ["config", "sqlite_open", "sqlite_writable", "probe"]


def test_fdb_without_client_library_names_the_step_and_the_fix(tmp_path: Path) -> None:
    pytest.importorskip("fdb")
    import ctypes.util

    if ctypes.util.find_library("fdb_c"):
        pytest.skip("libfdb_c is installed here; this test is about its absence")
    repo = Path(__file__).resolve().parent.parent
    result = _run("--config", str(repo / "config" / "codi2.toml"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("PASS  config")
    assert lines[1].startswith("FAIL  libfdb_c") and "api_version 730" in lines[1]
    assert lines[2].strip() == (
        "hint: install foundationdb-clients 7.3, the series of the installed Python bindings"
        " (README: client/server version matrix)"
    )
    as_json = json.loads(_run("--config", str(repo / "config" / "codi2.toml"), "--json").stdout)
    assert as_json["ok"] is False and [s["name"] for s in as_json["steps"]] == ["config", "libfdb_c"]


def test_fdb_store_passes_every_step_through_conflicts_and_unknown_results(
    tmp_path: Path, fake_libfdb_c: Path, fdb_api: ModuleType
) -> None:
    cluster = tmp_path / "fdb.cluster"
    cluster.write_text("test:fake@127.0.0.1:4500\n")
    config = tmp_path / "c.toml"
    config.write_text(f"[foundationdb]\ncluster_file = {json.dumps(str(cluster))}\n")
    data = Path(f"{cluster}.fakefdb.sqlite")  # where the fake keeps the database of this cluster file
    for seed in range(1, 11):  # 20% of commits conflict and 20% end with commit_unknown_result
        env = {**fakefdb.child_env(fake_libfdb_c, data, "1020:0.2,1021:0.2", seed), "FDB_CLUSTER_FILE": str(cluster)}
        result = _run("--config", str(config), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        names = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("PASS")]
        assert names == ["config", "libfdb_c", "tls", "cluster_file", "database", "probe"]
    assert fakefdb.counters(data)["faults"]["1020"] and fakefdb.counters(data)["faults"]["1021"]
    db = fdb_api.open(str(cluster))  # the same data file, read in this process
    assert db.get_range_startswith(FdbSink(db, tenant_id=None).key(PROBE_TENANT, "probe")) == []


def test_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[storage]\nbackend = 'cassandra'\n")
    result = _run("--config", str(config))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "storage.backend" in result.stderr


def test_cluster_file_parsing() -> None:
    assert parse_cluster_file("# prod\ncoditect:production@10.128.0.8:4500\n") == (
        "coditect",
        "production",
        ["10.128.0.8:4500"],
    )
    assert parse_cluster_file("a:b@h1:1,h2:2:tls")[2] == ["h1:1", "h2:2:tls"]
    for bad in ("", "nope", "a:b@", "a:b@host", "a:b@h:1\nc:d@h:2"):
        with pytest.raises(ValueError):
            parse_cluster_file(bad)


def test_daemon_on_fdb_without_client_library_is_one_line_and_exit_1(tmp_path: Path) -> None:
    import ctypes.util

    if ctypes.util.find_library("fdb_c"):
        pytest.skip("libfdb_c is installed here; this test is about its absence")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nbind_addr = "127.0.0.1:0"\n[foundationdb]\ncluster_string = "a:b@127.0.0.1:4500"\n'
        f"[monitoring]\nwatch_paths = [{json.dumps(str(workspace))}]\n"
    )
    result = run_codi2("--config", str(config), "--user-id", "u", "--tenant-id", "t")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "codi2: cannot open the fdb store: libfdb_c, the FoundationDB client library for api_version 730,"
        " is not installed"
    )
    assert "Traceback" not in result.stderr


def test_a_missing_fdb_cluster_file_is_one_message_from_run_and_test(tmp_path: Path, fake_libfdb_c: Path) -> None:
    """The client's own error for it ("File could not be written (1514)") names neither the file nor the
    variable; `codi2 test` and the daemon say the same thing, with the file (#24, item 7)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("a")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nbind_addr = "127.0.0.1:0"\n[foundationdb]\ncluster_string = "a:b@127.0.0.1:4500"\n'
        f"[monitoring]\nwatch_paths = [{json.dumps(str(workspace))}]\n"
    )
    missing = tmp_path / "nowhere" / "fdb.cluster"
    env = {**fakefdb.child_env(fake_libfdb_c, tmp_path / "data.sqlite"), "FDB_CLUSTER_FILE": str(missing)}
    said = f"cluster file {missing} (FDB_CLUSTER_FILE): No such file or directory"
    checked = _run("--config", str(config), env=env)
    assert checked.returncode == 1
    assert checked.stdout.splitlines()[-2].startswith("FAIL  cluster_file") and said in checked.stdout
    assert checked.stdout.splitlines()[-1].strip() == "hint: mount the codi2-fdb Secret or set FDB_CLUSTER_FILE"
    ran = run_codi2("--config", str(config), "--user-id", "u", "--tenant-id", "t", env=env)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines()[-1] == f"codi2: cannot open the fdb store: {said}"
