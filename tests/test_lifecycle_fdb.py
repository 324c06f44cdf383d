"""The daemon's life cycle as real processes on FoundationDB (the fake libfdb_c): shutdown at awkward moments,
start-ups failing half-way, the journal damaged under it, /status while it all happens, the state dir moved.

Invariants: after the next start every change on disk is in the trail exactly once (the trail folds to the
disk, no event id twice, no defects), a clean SIGTERM with the store up leaves nothing in the spool, and a
start-up that fails says so in one line, without a traceback, leaving nothing that stops the next start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import fakefdb
import pytest
from conftest import WAIT_S, run_codi2, wait_for
from trail_checks import (
    FdbDaemon,
    assert_no_defects,
    converge,
    describe,
    overwrite_pages,
    run_verify,
    write_fdb_config,
)

StartFdb = Callable[..., FdbDaemon]


@pytest.fixture
def fdb_config(tmp_path: Path, workspace: Path) -> Path:
    return write_fdb_config(tmp_path / "codi2.toml", workspace, tmp_path / "fdb.cluster")


@pytest.fixture
def fdb_data(tmp_path: Path) -> Path:
    return tmp_path / "fdb.sqlite"


@pytest.fixture
def start_fdb(
    fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, spawned: Callable[[FdbDaemon], FdbDaemon]
) -> Iterator[StartFdb]:
    def start(**kwargs: object) -> FdbDaemon:
        return spawned(FdbDaemon(fdb_config, fdb_data, fake_libfdb_c, **kwargs))  # type: ignore[arg-type]

    yield start
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


def restart_and_check(start_fdb: StartFdb, workspace: Path) -> FdbDaemon:
    """The next start: the trail folds to the disk without defects, and a clean stop."""
    again = start_fdb()
    check_trail(again, workspace)
    assert again.terminate() == 0
    return again


def verify(config: Path, data: Path, lib: Path, workspace: Path) -> None:
    code, report, stderr = run_verify(config, "--disk", str(workspace), env=fakefdb.child_env(lib, data))
    assert code == 0, (report, stderr)


# Shutdown at awkward moments, FoundationDB ------------------------------------------------------------


def test_sigterm_mid_burst_with_the_store_up_ships_everything(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    daemon = start_fdb()
    burst(workspace, "a", 400)
    code = daemon.terminate(WAIT_S)
    assert code == 0, daemon.logs[-10:]
    assert logged(daemon, "events_left_in_spool") == [], daemon.logs[-10:]
    again = restart_and_check(start_fdb, workspace)
    assert logged(again, "events_left_in_spool") == []
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


def test_sigterm_during_an_outage_keeps_the_spool_for_the_next_start(
    workspace: Path,
    fdb_config: Path,
    fdb_data: Path,
    fake_libfdb_c: Path,
    start_fdb: StartFdb,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CODI2_SERVER__SHUTDOWN_TIMEOUT_S", "1")  # shipping retries until then
    daemon = start_fdb()
    daemon.down.touch()
    burst(workspace, "a", 50)
    wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
    wait_for(lambda: daemon.status()["spool"]["events"] >= 51)
    code = daemon.terminate(WAIT_S)
    assert code == 0, daemon.logs[-10:]
    assert logged(daemon, "events_left_in_spool"), daemon.logs[-10:]
    monkeypatch.delenv("CODI2_SERVER__SHUTDOWN_TIMEOUT_S")
    daemon.down.unlink()
    restart_and_check(start_fdb, workspace)
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


def test_a_second_signal_during_an_outage_stops_at_once_and_the_spool_is_shipped_at_the_next_start(
    workspace: Path,
    fdb_config: Path,
    fdb_data: Path,
    fake_libfdb_c: Path,
    start_fdb: StartFdb,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second signal ends a drain that would not (the shipper retrying an absent cluster) at once, with the
    batches it leaves in the spool named; the next start ships them, each event once."""
    monkeypatch.setenv("CODI2_SERVER__SHUTDOWN_TIMEOUT_S", "3600")
    daemon = start_fdb()
    daemon.down.touch()
    burst(workspace, "a", 50)
    wait_for(lambda: daemon.status()["spool"]["events"] >= 51)
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: logged(daemon, "shutdown_requested"))
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.wait(WAIT_S)  # a generous bound: the drain alone would take an hour
    assert code == 1, daemon.logs[-10:]
    [forced] = logged(daemon, "shutdown_forced")
    assert forced["events_left_in_spool"] >= 51, forced
    monkeypatch.delenv("CODI2_SERVER__SHUTDOWN_TIMEOUT_S")
    daemon.down.unlink()
    again = restart_and_check(start_fdb, workspace)
    assert logged(again, "events_left_in_spool") == []
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


def test_sigterm_right_after_an_outage_ends_ships_everything(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    daemon = start_fdb()
    daemon.down.touch()
    burst(workspace, "a", 50)
    wait_for(lambda: daemon.status()["store"]["consecutive_failures"] >= 6)  # backing off by now
    daemon.down.unlink()
    code = daemon.terminate(WAIT_S)
    assert code == 0, daemon.logs[-10:]
    assert logged(daemon, "events_left_in_spool") == [], daemon.logs[-10:]
    restart_and_check(start_fdb, workspace)


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
    restart_and_check(start_fdb, workspace)
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
    failed = run_codi2(
        "--config",
        str(fdb_config),
        "--user-id",
        "u1",
        "--tenant-id",
        "t1",
        env=fakefdb.child_env(fake_libfdb_c, fdb_data),
        timeout=WAIT_S,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("codi2: cannot open the fdb store: no FoundationDB")
    assert "Traceback" not in failed.stderr
    cluster.write_text("test:fake@127.0.0.1:4500\n")
    daemon = start_fdb()
    events = converge(daemon, workspace)
    assert [(e.action, e.path, e.origin) for e in events] == [("created", "found.txt", "baseline")], describe(events)
    assert daemon.terminate() == 0


# /status and /metrics through a whole life ------------------------------------------------------------


class Poller:
    """Polls /status, /metrics, /readyz and /livez from a thread, from before the port opens until the
    process is gone; notes every answer that is not a well-formed one."""

    KEYS: ClassVar[set[str]] = {
        "status",
        "degraded_reasons",
        "ready",
        "store",
        "spool",
        "journal",
        "chain",
        "initial_scan",
        "watches",
    }

    def __init__(self, port: int) -> None:
        self.port = port
        self.bad: list[str] = []
        self.seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _get(self, path: str) -> tuple[int, str] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return None  # not listening (yet, or any more)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in ("/status", "/metrics", "/readyz", "/livez"):
                got = self._get(path)
                if got is None:
                    continue
                code, body = got
                self.seen[path] = self.seen.get(path, 0) + 1
                if path in ("/readyz", "/livez"):
                    if code not in (200, 503) or (path == "/livez" and code != 200):
                        self.bad.append(f"{path}: {code} {body[:300]}")
                    continue
                if code != 200:
                    self.bad.append(f"{path}: {code} {body[:300]}")
                elif path == "/status":
                    try:
                        missing = self.KEYS - set(json.loads(body))
                    except ValueError as exc:
                        missing = {f"not JSON: {exc}"}
                    if missing:
                        self.bad.append(f"/status lacks {missing}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_and_metrics_answer_through_start_up_an_outage_and_shutdown(
    workspace: Path, fdb_config: Path, start_fdb: StartFdb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODI2_SERVER__SHUTDOWN_TIMEOUT_S", "2")  # the shutdown ships into the outage until then
    port = _free_port()
    fdb_config.write_text(fdb_config.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"'))
    for i in range(1500):  # watches to place: start-up takes a while
        (workspace / f"d{i // 50}" / f"e{i}").mkdir(parents=True)
    poller = Poller(port)
    try:
        daemon = start_fdb()
        daemon.down.touch()
        burst(workspace, "a", 30)
        wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
        assert daemon.terminate(WAIT_S) == 0
        monkeypatch.delenv("CODI2_SERVER__SHUTDOWN_TIMEOUT_S")
        daemon.down.unlink()
        restart_and_check(start_fdb, workspace)
    finally:
        poller.stop()
    assert poller.bad == [], poller.bad[:10]
    assert poller.seen.get("/status", 0) > 10


# The journal damaged under a running daemon on FoundationDB ---------------------------------------------


def _overwrite_first_page(journal: Path) -> None:
    """The journal's header page overwritten under the running daemon."""
    overwrite_pages(journal, lambda db: [1], b"\xa5")


def test_journal_header_damaged_under_an_idle_daemon_is_recovered_at_the_next_change(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    """Found by attack: with the journal's first page damaged, the journal thread's check of the
    `needs_rebuild` flag (a read of the journal's meta, outside any error handling) raised, and the thread
    died: nothing was recorded any more, /status still said `ok` (no reason), only /readyz and /livez failed."""
    (workspace / "before.txt").write_text("before")
    daemon = start_fdb()
    _overwrite_first_page(workspace / ".codi2" / "journal.db")
    (workspace / "later.txt").write_text("a change after the damage")
    wait_for(lambda: logged(daemon, "journal_recovered") or logged(daemon, "journal_thread_failed"))
    assert logged(daemon, "journal_thread_failed") == []
    check_trail(daemon, workspace)
    status = daemon.status()
    assert status["status"] == "ok" and status["ready"], status
    assert daemon.terminate() == 0
    restart_and_check(start_fdb, workspace)


def test_journal_header_damaged_with_batches_waiting_for_the_store_is_recovered_and_shipped(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    """Found by attack: the shipper, reading back the outbox (more batches waited than it keeps in memory),
    found the journal damaged and logged `outbox_read_failed` every second, for as long as no change woke the
    journal thread to find the damage and recover: the waiting batches were never shipped."""
    daemon = start_fdb()
    daemon.down.touch()
    for i in range(60):  # more batches than the shipper keeps in memory: it reads the outbox back
        (workspace / f"w{i}.txt").write_text(str(i))
        wait_for(lambda i=i: daemon.status()["spool"]["events"] >= i + 1)
    wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
    _overwrite_first_page(workspace / ".codi2" / "journal.db")
    daemon.down.unlink()
    check_trail(daemon, workspace)  # no change to wake the journal thread: the shipper's finding recovers it
    wait_for(lambda: daemon.status()["spool"]["events"] == 0)
    assert len(logged(daemon, "outbox_read_failed")) <= 1
    assert logged(daemon, "journal_thread_failed") == []
    (workspace / "later.txt").write_text("a change after the recovery")
    check_trail(daemon, workspace)
    assert daemon.terminate() == 0
    assert logged(daemon, "events_left_in_spool") == []
    restart_and_check(start_fdb, workspace)
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


# The state dir moved by the user (the entrypoint layout: `<workspace>/.codi2`) ------------------------------


def test_state_dir_renamed_while_running_then_restart(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    (workspace / "a.txt").write_text("a")
    daemon = start_fdb()
    (workspace / ".codi2").rename(workspace / "moved")
    (workspace / "b.txt").write_text("b")
    (workspace / "moved" / "mine.txt").write_text("the user's, in the daemon's own dir")
    converge(daemon, workspace, ignored=lambda rel, is_dir: rel == "moved" or rel.startswith("moved/"))
    status = daemon.status()
    assert status["ready"], status
    (workspace / "c.txt").write_text("c")
    code = daemon.terminate(WAIT_S)
    assert code == 0, daemon.logs[-10:]
    assert logged(daemon, "events_left_in_spool") == []
    restart_and_check(start_fdb, workspace)  # a new state dir; `moved` is the user's now
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


def test_sigterm_during_start_up_then_restart(
    workspace: Path, tmp_path: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    for i in range(1500):  # watches to place: start-up takes a while
        (workspace / f"d{i // 50}" / f"e{i}").mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "codi2", "--config", str(fdb_config), "--user-id", "u1", "--tenant-id", "t1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **fakefdb.child_env(fake_libfdb_c, fdb_data)},
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # the journal is open: SIGTERM, then SIGINT (stop at once), while the watches are placed
        if "index_rebuilt" in line or "codi2_ready" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(WAIT_S) in (0, 1), rest[-2000:]
    assert "Traceback" not in rest, rest[-3000:]
    restart_and_check(start_fdb, workspace)
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)


def test_sigterm_right_after_the_journal_is_damaged_with_batches_waiting(
    workspace: Path, fdb_config: Path, fdb_data: Path, fake_libfdb_c: Path, start_fdb: StartFdb
) -> None:
    """Found by attack: the shipper, retrying the old journal's first batch when the store came back, committed
    it after the recovered journal's index rebuild had read the store: the rebuild's diff recorded its change
    again (`created` twice). A renewal now waits until the shipper has let go of the old journal's batches."""
    daemon = start_fdb()
    daemon.down.touch()
    for i in range(40):
        (workspace / f"w{i}.txt").write_text(str(i))
        wait_for(lambda i=i: daemon.status()["spool"]["events"] >= i + 1)
    _overwrite_first_page(workspace / ".codi2" / "journal.db")
    daemon.down.unlink()
    (workspace / "last.txt").write_text("last")
    code = daemon.terminate(WAIT_S)
    assert logged(daemon, "journal_thread_failed") == [] and logged(daemon, "shipper_failed") == []
    assert code == 0, daemon.logs[-10:]
    restart_and_check(start_fdb, workspace)
    verify(fdb_config, fdb_data, fake_libfdb_c, workspace)
