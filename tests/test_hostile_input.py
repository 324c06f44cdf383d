"""Hostile or mistaken input gets one line and exit 2, never a hang, a crash or a silent default (#22, 8 and 3)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import run_codi2
from test_mounts import mounted


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CODI2_") or name in ("TENANT_ID", "USER_ID", "SESSION_ID"):
            monkeypatch.delenv(name)


def _one_line_exit_2(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[monitoring]\nwatch_paths = [""]\n', "monitoring.watch_paths.0", "empty path"),
        ('[monitoring]\nwatch_paths = ["/tmp/a\\u0000b"]\n', "monitoring.watch_paths.0", "NUL"),
        ('[state]\ndir = ""\n', "state.dir", "empty path"),
        ('[storage]\nsqlite_path = "x\\u0000y"\n', "storage.sqlite_path", "NUL"),
        ("[monitoring]\nrescan_interval_s = inf\n", "monitoring.rescan_interval_s", "finite"),
        ("[monitoring]\nrescan_interval_s = nan\n", "monitoring.rescan_interval_s", "finite"),
        ("[foundationdb]\nevent_id_retention_hours = inf\n", "foundationdb.event_id_retention_hours", "finite"),
        ("[batching]\nmax_events = 1e29\n", "batching.max_events", ""),
        ("[batching]\nmax_events = 100000000\n", "batching.max_events", "less than or equal to 100000"),
        ("[monitoring]\nhash_max_bytes = 1e300\n", "monitoring.hash_max_bytes", ""),
        ("a = " + "[" * 50_000 + "]" * 50_000 + "\n", "", "nested too deeply"),
    ],
)
def test_hostile_config_values_are_one_line_and_exit_2(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = tmp_path / "codi2.toml"
    path.write_text(text)
    run = ["--config", str(path), "--user-id", "u", "--tenant-id", "t"]
    for args in (["config", "check", "--config", str(path)], run):
        line = _one_line_exit_2(run_codi2(*args), str(path), fragment)
        assert f": {key}:" in line or not key, line


@pytest.mark.parametrize("shape", ["nested", "same", "symlinked parent", "three with one nested"])
def test_overlapping_roots_are_refused_after_resolving_symlinks(tmp_path: Path, shape: str) -> None:
    """Overlapping roots are refused at config time (the choice the issue offers): a change in the overlap would
    reach only one root's watches, so the other root's trail would silently miss it."""
    a = tmp_path / "a"
    (a / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "link").symlink_to(a)
    roots = {
        "nested": [a, a / "b"],
        "same": [a, tmp_path / "link"],
        "symlinked parent": [tmp_path / "link" / "b", a],
        "three with one nested": [tmp_path / "c", a, tmp_path / "link" / "b"],
    }[shape]
    path = tmp_path / "codi2.toml"
    path.write_text("[monitoring]\nwatch_paths = [" + ", ".join(f'"{r}"' for r in roots) + "]\n")
    line = _one_line_exit_2(run_codi2("config", "check", "--config", str(path)), "monitoring.watch_paths")
    assert "inside" in line or "same directory" in line


@pytest.mark.parametrize("shape", ["same", "nested", "nested the other way"])
def test_roots_overlapping_through_a_bind_mount_are_refused(tmp_path: Path, shape: str) -> None:
    """realpath keeps a bind mount's two paths apart, so [a, alias] and [a, alias/b] passed, and inotify gave
    the overlap one watch: a file written in it reached one root's trail only (the other's verify --disk
    named it missing). The roots' device and inode numbers tell."""
    a, alias = tmp_path / "a", tmp_path / "alias"
    (a / "b").mkdir(parents=True)
    alias.mkdir()
    roots = {"same": [a, alias], "nested": [a, alias / "b"], "nested the other way": [a / "b", alias]}[shape]
    path = tmp_path / "codi2.toml"
    path.write_text("[monitoring]\nwatch_paths = [" + ", ".join(f'"{r}"' for r in roots) + "]\n")
    with mounted("--bind", str(a), target=alias):
        line = _one_line_exit_2(run_codi2("config", "check", "--config", str(path)), "monitoring.watch_paths")
    assert "bind mount" in line and ("inside" in line or "same directory" in line)


def test_disjoint_roots_and_siblings_with_a_common_prefix_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws2").mkdir()
    path = tmp_path / "codi2.toml"
    path.write_text(f'[monitoring]\nwatch_paths = ["{tmp_path / "ws"}", "{tmp_path / "ws2"}"]\n')
    result = run_codi2("config", "check", "--config", str(path))
    assert result.returncode == 0, result.stderr


def _key_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20))
    sock = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    server.close()
    return {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "1 MiB file": big, "socket": sock, "directory": tmp_path}


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "1 MiB file", "socket", "directory"])
def test_key_file_is_read_with_a_bound_and_never_hangs(tmp_path: Path, kind: str) -> None:
    """`verify --key-file /dev/zero` read until the OOM killer came; a FIFO would hang. Both the CLI flag and the
    daemon's `[integrity] key_file` answer in one line (the timeout below fails the test on a hang)."""
    key = _key_files(tmp_path)[kind]
    line = _one_line_exit_2(run_codi2("verify", "--tenant-id", "t", "--key-file", str(key), timeout=30), "--key-file")
    assert "regular file" in line or "more than 4096 bytes" in line or "cannot read" in line
    ws = tmp_path / "ws"
    ws.mkdir()
    config = tmp_path / "codi2.toml"
    config.write_text(
        f'[monitoring]\nwatch_paths = ["{ws}"]\n[state]\ndir = "{tmp_path / "state"}"\n'
        f'[integrity]\nkey_file = "{key}"\n[server]\nbind_addr = "127.0.0.1:0"\n'
    )
    result = run_codi2("run", "--config", str(config), "--user-id", "u", "--tenant-id", "t", timeout=30)
    _one_line_exit_2(result, "integrity.key_file")
