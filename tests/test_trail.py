"""The tamper-evident trail end to end on SQLite, with real processes: `codi2 run` killed with SIGKILL
mid-burst, its store locked away, restarted with a rotated key, and `codi2 verify` over what it wrote
(FoundationDB's run is in test_daemon_fdb.py; tampering of every kind, on both, in sink_contract.py)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from conftest import WAIT_S, DaemonProcess, read_events, wait_for
from trail_checks import run_verify

from codi2.trail.chain import load_key

Start = Callable[..., DaemonProcess]
WRITER = """
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.join(root, "burst"), exist_ok=True)
for i in range(n):
    with open(os.path.join(root, "burst", f"f{i:05d}"), "w") as f:
        f.write(str(i))
"""
LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
"""


def test_the_trail_verifies_across_a_kill_an_outage_restarts_and_a_key_rotation(
    workspace: Path, tmp_path: Path, daemon_factory: Start
) -> None:
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    # Hex: random bytes end in CR or LF one time in 128, which the key file's reader strips (a 31-byte key).
    old_key.write_bytes(os.urandom(32).hex().encode())
    new_key.write_bytes(os.urandom(32).hex().encode())
    daemon = daemon_factory(extra=f'[integrity]\nkey_file = "{old_key}"')
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(workspace), "3000"])
    wait_for(lambda: len(daemon.events()) >= 300, interval=0.01)
    daemon.proc.send_signal(signal.SIGKILL)  # mid-burst
    daemon.proc.wait()
    assert writer.wait(120) == 0

    daemon = daemon_factory(extra=f'[integrity]\nkey_file = "{old_key}"')  # the start-up diff finds the rest
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(daemon.db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"  # the store is unavailable
    (workspace / "during-the-outage.txt").write_text("x")
    wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
    holder.communicate("\n", timeout=WAIT_S)
    wait_for(lambda: "during-the-outage.txt" in {e.path for e in daemon.events()})
    assert daemon.terminate() == 0

    daemon = daemon_factory(extra=f'[integrity]\nkey_file = "{new_key}"')  # the key rotated
    (workspace / "after-the-rotation.txt").write_text("x")
    wait_for(lambda: "after-the-rotation.txt" in {e.path for e in daemon.events()})
    chain = daemon.status()["chain"]
    assert daemon.terminate() == 0
    old_id, new_id = load_key(old_key).id, load_key(new_key).id
    assert chain["key_id"] == new_id

    code, report, _ = run_verify(
        daemon.config, "--key-file", str(old_key), "--key-file", str(new_key), "--disk", str(workspace)
    )
    assert code == 0 and report["ok"] and report["disk"]["differences"] == []
    [stream] = report["streams"]  # one stream: the journal's, across the kill and every restart
    assert stream["stream_id"] == chain["stream_id"]
    assert stream["head_batch"] == chain["batches"] + 1  # the run's `stop`, committed after /status was read
    every = read_events(daemon.db, lifecycle=True)
    assert stream["key_ids"] == [old_id, new_id] and stream["events"] == report["trail_events"] == len(every)
    assert any(e.action == "gap" and e.dest_path == "journal_error" for e in daemon.events())  # gaps are chained too

    code, report, _ = run_verify(daemon.config, "--key-file", str(new_key))
    assert code == 1 and [b["kind"] for b in report["streams"][0]["breaks"]] == ["unknown_key"]

    with closing(sqlite3.connect(daemon.db)) as db, db:
        db.execute("DELETE FROM events WHERE pos = (SELECT max(pos) / 2 FROM events)")
    code, report, _ = run_verify(daemon.config, "--key-file", str(old_key), "--key-file", str(new_key))
    assert code == 1 and [b["kind"] for b in report["streams"][0]["breaks"]] == ["event_removed"]


def test_verify_prints_a_report_and_refuses_a_bad_key_file(
    workspace: Path, tmp_path: Path, daemon_factory: Start
) -> None:
    daemon = daemon_factory()
    (workspace / "a.txt").write_text("a")
    wait_for(lambda: daemon.events())
    assert daemon.terminate() == 0
    result = subprocess.run(
        [sys.executable, "-m", "codi2", "verify", "--config", str(daemon.config), "--tenant-id", "t1"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("stream ") and "keys: none (SHA-256)" in lines[2]
    assert lines[-1].startswith("tenant t1: intact (streams 1, ")
    short = tmp_path / "short.key"
    short.write_text("secret\n")
    code, _, stderr = run_verify(daemon.config, "--key-file", str(short))
    assert (
        code == 2
        and stderr
        == f"codi2: --key-file: {short} holds 6 bytes; a key needs at least 32 (head -c 32 /dev/urandom > FILE)\n"
    )


def test_an_event_hidden_from_reads_by_editing_its_row_s_index_columns_is_named(
    workspace: Path, daemon_factory: Start
) -> None:
    """The `events` table's `tenant_id` and `ts` columns are what reads filter on, outside the link: an event
    whose column was edited drops out of `codi2 events` with its record and its batch intact."""
    for name in ("a", "b", "c"):
        (workspace / f"{name}.txt").write_text(name)
    daemon = daemon_factory()
    wait_for(lambda: len(daemon.events()) == 3)
    assert daemon.terminate() == 0
    assert run_verify(daemon.config)[0] == 0
    with closing(sqlite3.connect(daemon.db)) as db, db:
        db.execute("UPDATE events SET tenant_id = 'elsewhere' WHERE pos = 2")
    assert len(daemon.events()) == 2
    code, report, _ = run_verify(daemon.config)
    [b] = report["streams"][0]["breaks"]
    assert code == 1 and b["kind"] == "event_removed" and "not in the tenant's trail as it is read" in b["detail"]
    with closing(sqlite3.connect(daemon.db)) as db, db:
        db.execute("UPDATE events SET tenant_id = 't1', ts = '2000-01-01T00:00:00.000000Z' WHERE pos = 2")
    assert run_verify(daemon.config)[0] == 0  # read without a time filter, the trail is whole
    code, report, _ = run_verify(daemon.config, "--since", "2001-01-01T00:00:00Z")
    assert code == 1 and [b["kind"] for b in report["streams"][0]["breaks"]] == ["event_removed"]
