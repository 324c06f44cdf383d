"""Attacks on the daemon's life cycle with real processes: shutdown at awkward moments on FoundationDB (the
fake libfdb_c), start-ups failing half-way, /status while it all happens, the state dir moved by the user.

Invariants: after the next start every change on disk is in the trail exactly once (the trail folds to the
disk, no event id twice, no defects), a clean SIGTERM with the store up leaves nothing in the spool, and a
start-up that fails says so in one line, without a traceback, leaving nothing that stops the next start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import fakefdb
import pytest
from conftest import WAIT_S, wait_for
from trail_checks import FdbDaemon, assert_no_defects, converge, describe, diff, disk_state, write_fdb_config

from codi2.replay import fold

StartFdb = Callable[..., FdbDaemon]


@pytest.fixture
def fdb_config(tmp_path: Path, workspace: Path) -> Path:
    return write_fdb_config(tmp_path / "codi2.toml", workspace, tmp_path / "fdb.cluster")


@pytest.fixture
def fdb_data(tmp_path: Path) -> Path:
    return tmp_path / "fdb.sqlite"


@pytest.fixture
def start_fdb(fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path) -> Iterator[StartFdb]:
    started: list[FdbDaemon] = []

    def start(**kwargs: object) -> FdbDaemon:
        daemon = FdbDaemon(fdb_config, fdb_data, fake_libfdb_c, **kwargs)  # type: ignore[arg-type]
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()
    Path(f"{fdb_data}.down").unlink(missing_ok=True)


def logged(daemon: FdbDaemon, event: str) -> list[dict]:
    return [line for line in daemon.logs if line.get("event") == event]


def burst(workspace: Path, prefix: str, count: int) -> None:
    (workspace / prefix).mkdir(exist_ok=True)
    for i in range(count):
        (workspace / prefix / f"f{i}.txt").write_text(f"{prefix} {i}")


def check_trail(daemon: FdbDaemon, workspace: Path) -> None:
    events = converge(daemon, workspace, timeout=WAIT_S)
    assert_no_defects(events)


def verify(config: Path, data: Path, lib: Path, workspace: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "codi2", "verify", "--config", str(config), "--tenant-id", "t1", "--json"]
        + ["--disk", str(workspace)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, **fakefdb.child_env(lib, data)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


# Shutdown at awkward moments, FoundationDB ------------------------------------------------------------


def test_sigterm_mid_burst_with_the_store_up_ships_everything(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    daemon = start_fdb()
    burst(workspace, "a", 400)
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(WAIT_S)
    daemon._reader.join(5)
    assert code == 0, daemon.logs[-10:]
    assert logged(daemon, "events_left_in_spool") == [], daemon.logs[-10:]
    again = start_fdb()
    check_trail(again, workspace)
    assert again.terminate() == 0
    assert logged(again, "events_left_in_spool") == []
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


def test_sigterm_during_an_outage_keeps_the_spool_for_the_next_start(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    daemon = start_fdb()
    daemon.down.touch()
    burst(workspace, "a", 50)
    wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
    wait_for(lambda: daemon.status()["spool"]["events"] >= 51)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.send_signal(signal.SIGTERM)  # twice
    code = daemon.proc.wait(WAIT_S)
    daemon._reader.join(5)
    assert code == 0, daemon.logs[-10:]
    assert logged(daemon, "events_left_in_spool"), daemon.logs[-10:]
    daemon.down.unlink()
    again = start_fdb()
    check_trail(again, workspace)
    assert again.terminate() == 0
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


def test_sigterm_right_after_an_outage_ends_ships_everything(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    daemon = start_fdb()
    daemon.down.touch()
    burst(workspace, "a", 50)
    wait_for(lambda: daemon.status()["store"]["consecutive_failures"] >= 6)  # backing off by now
    daemon.down.unlink()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(WAIT_S)
    daemon._reader.join(5)
    assert code == 0, daemon.logs[-10:]
    assert logged(daemon, "events_left_in_spool") == [], daemon.logs[-10:]
    again = start_fdb()
    check_trail(again, workspace)
    assert again.terminate() == 0


def test_sigkill_mid_burst_during_an_outage_then_restart(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    daemon = start_fdb()
    burst(workspace, "a", 100)
    daemon.down.touch()
    burst(workspace, "b", 100)
    daemon.kill()
    daemon.down.unlink()
    burst(workspace, "c", 20)
    again = start_fdb()
    check_trail(again, workspace)
    assert again.terminate() == 0
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


# Start-ups failing half-way ---------------------------------------------------------------------------


def test_a_first_start_failing_at_the_store_leaves_the_next_start_a_first_start(
    workspace: Path, tmp_path: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    """Found by attack: the journal is opened (created, flagged for a rebuild from the store) before the store;
    a first start that then fails (no cluster file yet) left a journal that made the next start, the real first
    one, record the workspace as changed while the daemon was down (`offline`) instead of its `baseline`
    (and with `initial_scan = "silent"`, record it all instead of nothing)."""
    (workspace / "found.txt").write_text("here before codi2")
    cluster = tmp_path / "fdb.cluster"
    cluster.unlink()
    failed = subprocess.run(
        [sys.executable, "-m", "codi2", "--config", str(fdb_config), "--user-id", "u1", "--tenant-id", "t1"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, **fakefdb.child_env(fake_libfdb_c, fdb_data)},
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("codi2: cannot open the fdb store: no FoundationDB")
    assert "Traceback" not in failed.stderr
    cluster.write_text("test:fake@127.0.0.1:4500\n")
    daemon = start_fdb()
    events = converge(daemon, workspace)
    assert [(e.action, e.path, e.origin) for e in events] == [("created", "found.txt", "baseline")], describe(events)
    assert daemon.terminate() == 0
