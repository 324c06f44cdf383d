"""The daemon as a real subprocess on a real tree, read back from the real SQLite file."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from conftest import WAIT_S, DaemonProcess, disk_state, wait_for
from trail_checks import StoreOutage

from codi2.trail.events import EVENT_KEYS
from codi2.trail.replay import fold

Start = Callable[..., DaemonProcess]


def _created(daemon: DaemonProcess) -> list[str]:
    return [e.path for e in daemon.events() if e.action == "created" and e.type == "file"]


def test_burst_is_recorded_exactly_once_and_ignored_trees_cost_nothing(workspace: Path, daemon_factory: Start) -> None:
    for i in range(20):
        (workspace / "node_modules" / f"pkg{i}" / "lib").mkdir(parents=True)
    daemon = daemon_factory()
    watches_before = daemon.status()["watches"]
    assert watches_before == 1
    expected = set()
    for a in range(10):
        for b in range(10):
            d = workspace / f"src{a}" / f"mod{b}"
            d.mkdir(parents=True)
            for f in range(20):
                (d / f"file{f}.py").write_text(f"print({a}, {b}, {f})\n")
                expected.add(f"src{a}/mod{b}/file{f}.py")
    for i in range(500):
        (workspace / "node_modules" / f"pkg{i % 20}" / "lib" / f"m{i}.js").write_text("x")
    (workspace / "src0" / "node_modules" / "deep").mkdir(parents=True)
    (workspace / "src0" / "node_modules" / "deep" / "index.js").write_text("x")

    wait_for(lambda: len(_created(daemon)) >= 2000)
    assert daemon.terminate() == 0
    created = Counter(_created(daemon))
    assert set(created) == expected
    assert all(n == 1 for n in created.values()), [p for p, n in created.items() if n > 1][:5]
    assert not [e for e in daemon.events() if "node_modules" in e.path]
    dirs = [e.path for e in daemon.events() if e.action == "created" and e.type == "dir"]
    assert sorted(dirs) == sorted(
        [f"src{a}" for a in range(10)] + [f"src{a}/mod{b}" for a in range(10) for b in range(10)]
    )


def test_changes_carry_identity_content_and_order(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory(env={"SESSION_ID": "sess-7"})
    f = workspace / "notes.txt"
    f.write_text("draft")
    wait_for(lambda: [e for e in daemon.events() if e.path == "notes.txt"])
    for i in range(50):  # an editor saving many times in one window: coalesced, never reordered
        f.write_text(f"version {i}")
    f.chmod(0o600)
    final_hash = hashlib.sha256(b"version 49").hexdigest()
    wait_for(lambda: [e for e in daemon.events() if e.path == "notes.txt" and e.mode == 0o600])
    (workspace / "dir").mkdir()
    f.rename(workspace / "dir" / "final.txt")
    (workspace / "dir").rename(workspace / "renamed")
    (workspace / "gone.txt").write_text("bye")
    (workspace / "gone.txt").unlink()
    (workspace / "link").symlink_to("/etc/passwd")
    wait_for(lambda: [e for e in daemon.events() if e.path == "link"])
    assert daemon.terminate() == 0

    events = daemon.events()
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert len({e.id for e in events}) == len(events)
    assert {(e.tenant_id, e.user_id, e.session_id, e.pod) for e in events} == {("t1", "u1", "sess-7", "pod-test")}
    assert {e.origin for e in events} == {"live"}
    assert {e.root for e in events} == {str(workspace)}

    notes = [e for e in events if e.path == "notes.txt"]
    assert notes[0].action == "created"
    assert notes[0].sha256 in (hashlib.sha256(b"draft").hexdigest(), hashlib.sha256(b"version 49").hexdigest())
    updates = [e for e in notes if e.action == "updated"]
    assert len(updates) < 50  # coalesced
    last = [e for e in notes if e.action in ("created", "updated")][-1]
    assert (last.sha256, last.size, last.mode) == (final_hash, len("version 49"), 0o600)
    # Whatever the kernel showed (the directory may be renamed before its watch exists), folding the
    # trail must give exactly what is on disk.
    renamed = [(e.action, e.path, e.dest_path) for e in events if "renamed" in (e.path, e.dest_path)]
    assert renamed in ([("moved", "dir", "renamed")], [("created", "renamed", None)])
    assert fold(events) == disk_state(workspace)
    gone = [e.action for e in events if e.path == "gone.txt"]
    assert gone[0] == "created" and gone[-1] == "deleted"
    link = next(e for e in events if e.path == "link")
    assert (link.type, link.sha256, link.size) == ("symlink", None, len("/etc/passwd"))


def test_hostile_names_are_recorded_losslessly(workspace: Path, daemon_factory: Start, tmp_path: Path) -> None:
    daemon = daemon_factory()
    raw = b"caf\xe9-\xff.bin"
    with open(os.fsencode(workspace) + b"/" + raw, "wb") as f:
        f.write(b"latin-1 name")
    (workspace / "two\nlines.txt").write_text("newline in the name")
    wait_for(lambda: len(daemon.events()) >= 2)
    assert daemon.terminate() == 0
    paths = {os.fsencode(e.path) for e in daemon.events()}
    assert {raw, b"two\nlines.txt"} <= paths

    out = subprocess.run(
        [sys.executable, "-m", "codi2", "events", "--config", str(daemon.config), "--tenant-id", "t1"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    lines = out.stdout.decode("ascii").splitlines()  # ASCII-only JSON: one event per line, always
    records = [json.loads(line) for line in lines]
    assert all(tuple(r) == EVENT_KEYS for r in records)
    assert {os.fsencode(r["path"]) for r in records} == paths

    replay = subprocess.run(
        [sys.executable, "-m", "codi2", "events", "--config", str(daemon.config), "--tenant-id", "t1", "--replay"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    implied = {(r["root"], r["path"]): (r["type"], r["sha256"]) for r in map(json.loads, replay.stdout.splitlines())}
    assert implied == {key: (entry.type, entry.sha256) for key, entry in disk_state(workspace).items()}


def test_sigterm_mid_burst_flushes_everything_observed(workspace: Path, daemon_factory: Start) -> None:
    # A long window, so SIGTERM finds events still waiting in the pipeline.
    daemon = daemon_factory(env={"CODI2_BATCHING__MAX_DELAY_MS": "1000", "CODI2_BATCHING__MAX_EVENTS": "5000"})
    stop = threading.Event()
    written: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 20_000:
            d = workspace / f"b{i // 500}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}").write_text("x")
            written.append(f"b{i // 500}/f{i}")
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    wait_for(lambda: len(written) > 3000, interval=0.01)
    stop.set()
    thread.join()
    code = daemon.terminate()
    assert code == 0, daemon.logs[-5:]
    assert set(_created(daemon)) == set(written)
    assert any(line.get("event") == "codi2_stopped" and line.get("uncommitted") == 0 for line in daemon.logs)


def test_probes_metrics_and_status(workspace: Path, daemon_factory: Start) -> None:
    (workspace / "sub").mkdir()
    daemon = daemon_factory()
    for path in ("/livez", "/readyz", "/healthz"):
        assert daemon.get(path) == (200, "ok")
    code, body = daemon.get("/readyz?verbose")
    assert code == 200
    assert body.splitlines() == ["[+]watches ok", "[+]pipeline ok", "readyz check passed"]
    assert daemon.status()["initial_scan"] == "done"  # reported, but not part of readiness
    (workspace / "sub" / "a.txt").write_text("a")
    wait_for(lambda: daemon.events())
    status = daemon.status()
    assert status["status"] == "ok" and status["ready"] is True
    assert status["identity"] == {"tenant_id": "t1", "user_id": "u1", "session_id": None, "pod": "pod-test"}
    assert status["watch_roots"] == [str(workspace)] and status["watches"] == 2
    assert status["store"]["state"] == "ok" and status["last_commit"] is not None
    code, metrics = daemon.get("/metrics")
    assert code == 200
    for name in (
        'codi2_events_observed_total{action="created"}',
        "codi2_events_committed_total",
        "codi2_batch_commit_duration_seconds_bucket",
        "codi2_pipeline_queue_events",
        "codi2_inotify_watches 2.0",
        "codi2_inotify_overflows_total 0.0",
    ):
        assert name in metrics, name
    assert 'codi2_events_dropped_total{reason="shutdown_timeout"} 0.0' in metrics
    assert daemon.terminate() == 0


def test_store_outage_keeps_ready_and_loses_nothing(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    (workspace / "before.txt").write_text("x")
    wait_for(lambda: daemon.events())
    lock = sqlite3.connect(daemon.db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(50):
            (workspace / f"during{i}.txt").write_text("x")
        wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
        status = daemon.status()
        assert status["status"] == "degraded"
        assert status["store"]["error_code"] == "SQLITE_BUSY"
        assert daemon.get("/readyz")[0] == 200
        assert daemon.get("/livez")[0] == 200
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_for(lambda: daemon.status()["store"]["state"] == "ok")
    wait_for(lambda: len(_created(daemon)) >= 51)
    assert daemon.terminate() == 0
    assert Counter(_created(daemon)) == Counter(["before.txt"] + [f"during{i}.txt" for i in range(50)])


def test_a_shutdown_drains_for_the_configured_time_and_the_next_start_finds_the_rest(
    workspace: Path, daemon_factory: Start
) -> None:
    """`[server] shutdown_timeout_s` bounds the drain (it was a hard-coded 20 s, which Kubernetes' grace
    period had to be guessed from): a change a store outage kept from the journal is reported, not lost."""
    daemon = daemon_factory(env={"CODI2_SERVER__SHUTDOWN_TIMEOUT_S": "0.5"})
    outage = StoreOutage(daemon.db)  # with SQLite the journal is the store's file: nothing is journaled
    try:
        (workspace / "during.txt").write_text("x")
        wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
        code = daemon.terminate(WAIT_S)
    finally:
        outage.end()
    assert code == 1, daemon.logs[-10:]
    assert [line["timeout_s"] for line in daemon.logged("shutdown_requested")] == [0.5]
    assert daemon.logged("changes_not_journaled"), daemon.logs[-10:]
    assert daemon.logged("shutdown_forced") == []
    again = daemon_factory()
    wait_for(lambda: again.events())
    assert again.terminate() == 0
    assert [(e.action, e.path, e.origin) for e in again.events()] == [("created", "during.txt", "offline")]


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_second_signal_stops_at_once_and_the_next_start_loses_nothing(
    workspace: Path, daemon_factory: Start, second: signal.Signals
) -> None:
    """Found by the issue (#21): a second SIGTERM did nothing, so whoever sent it, seeing the daemon drain
    into a store outage, could only wait out the deadline or SIGKILL it blind. It now ends the process at
    once, saying what it left; the journal being durable, the next start finds all of it."""
    daemon = daemon_factory(env={"CODI2_SERVER__SHUTDOWN_TIMEOUT_S": "3600"})  # a drain that would not end
    outage = StoreOutage(daemon.db)
    try:
        for i in range(3):
            (workspace / f"during{i}.txt").write_text("x")
        wait_for(lambda: daemon.status()["store"]["state"] == "degraded")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: daemon.logged("shutdown_requested"))
        daemon.proc.send_signal(second)
        code = daemon.wait(WAIT_S)  # a generous bound: the drain alone would take an hour
    finally:
        outage.end()
    assert code == 1, daemon.logs[-10:]
    [forced] = daemon.logged("shutdown_forced")
    assert forced["signal"] == second.name and forced["changes_not_journaled"] >= 1, forced
    assert forced["events_left_in_spool"] == 0  # SQLite: nothing waits between the journal and the store
    assert daemon.logged("codi2_stopped") == []
    again = daemon_factory()
    wait_for(lambda: len(_created(again)) == 3)
    assert again.terminate() == 0
    assert sorted((e.action, e.path, e.origin) for e in again.events()) == [
        ("created", f"during{i}.txt", "offline") for i in range(3)
    ]
    assert fold(again.events()) == disk_state(workspace)


def test_busy_port_is_a_one_line_failure(workspace: Path, tmp_path: Path) -> None:
    from conftest import write_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.toml", workspace, tmp_path / "a.db")
        env = {**os.environ, "CODI2_SERVER__BIND_ADDR": f"127.0.0.1:{port}"}
        result = subprocess.run(
            [sys.executable, "-m", "codi2", "--config", str(config), "--user-id", "u", "--tenant-id", "t"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"codi2: cannot listen on 127.0.0.1:{port}:")
    assert "Traceback" not in result.stderr


def test_events_follow_prints_new_events(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    (workspace / "first.txt").write_text("1")
    wait_for(lambda: daemon.events())
    follower = subprocess.Popen(
        [sys.executable, "-m", "codi2", "events", "--config", str(daemon.config), "--tenant-id", "t1", "--follow"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["path"] == "first.txt"
        (workspace / "second.txt").write_text("2")
        assert json.loads(follower.stdout.readline())["path"] == "second.txt"
    finally:
        follower.terminate()
        follower.wait(10)
    assert daemon.terminate() == 0


def _user_namespaces_work() -> bool:
    probe = subprocess.run(["unshare", "-Ur", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def test_watch_limit_is_reported_and_not_fatal(workspace: Path, daemon_factory: Start) -> None:
    """In a user namespace of our own, `max_inotify_watches` is lowered without touching the host."""
    if not _user_namespaces_work():
        pytest.skip("unshare -Ur (user namespaces) not permitted on this machine")
    for i in range(30):
        (workspace / f"d{i:02d}").mkdir()
    limit = 12  # the barrier directory, the root's parent (for the root's removal), the root, 9 of the 30
    wrapper = ("unshare", "-Ur", "sh", "-c", f'echo {limit} > /proc/sys/user/max_inotify_watches && exec "$@"', "sh")
    daemon = daemon_factory(wrapper=wrapper)
    status = daemon.status()
    assert status["watches"] == limit - 2  # the tree's: the root and 9 directories
    assert len(status["unwatched"]) == 30 - (limit - 3)
    assert all("fs.inotify.max_user_watches" in reason for reason in status["unwatched"].values())
    assert status["status"] == "degraded"
    assert any("unwatched" in reason for reason in status["degraded_reasons"])
    assert daemon.get("/readyz")[0] == 200
    assert "codi2_unwatched_directories 21.0" in daemon.get("/metrics")[1]
    assert any(line.get("event") == "directory_unwatched" for line in daemon.logs)
    watched = sorted(set(f"d{i:02d}" for i in range(30)) - {Path(p).name for p in status["unwatched"]})
    (workspace / watched[0] / "seen.txt").write_text("x")
    wait_for(lambda: daemon.events())
    assert daemon.terminate() == 0


def test_events_cli_filters_and_formats(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    (workspace / "src").mkdir()
    (workspace / "src" / "a.py").write_text("a")
    (workspace / "notes.md").write_text("n")
    wait_for(lambda: len(daemon.events()) >= 3)
    (workspace / "notes.md").unlink()
    wait_for(lambda: any(e.action == "deleted" for e in daemon.events()))
    assert daemon.terminate() == 0
    base = [sys.executable, "-m", "codi2", "events", "--config", str(daemon.config), "--tenant-id", "t1"]

    def paths(*args: str) -> list[tuple[str, str]]:
        out = subprocess.run([*base, *args], capture_output=True, text=True, check=True, timeout=60).stdout
        return [(r["action"], r["path"]) for r in map(json.loads, out.splitlines())]

    assert paths("--path", "src/*") == [("created", "src/a.py")]
    assert paths("--action", "deleted") == [("deleted", "notes.md")]
    assert paths("--limit", "1") == [paths()[0]]
    assert paths("--since", "2999-01-01T00:00:00Z") == []
    table = subprocess.run([*base, "--format", "table"], capture_output=True, text=True, check=True, timeout=60)
    header = ["TS", "ACTION", "TYPE", "SIZE", "MODE", "ORIGIN", "USER", "SESSION", "OWNER", "PATH"]
    assert table.stdout.splitlines()[0].split() == header
    bad = subprocess.run([*base, "--since", "yesterday"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "codi2: --since: neither an ISO 8601 time nor a span such as 30m, 1h, 2d: 'yesterday'"
    )
    other = subprocess.run(
        [sys.executable, "-m", "codi2", "events", "--config", str(daemon.config), "--tenant-id", "nobody"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert other.stdout == ""


def _run_once(config: Path, user: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codi2", "--config", str(config), "--user-id", user, "--tenant-id", "t1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_second_daemon_on_the_same_sqlite_store_exits_with_one_line(
    workspace: Path, tmp_path: Path, daemon_factory: Start
) -> None:
    """The SQLite store's file is its daemon's journal (stream, chain head, index): a daemon of another state
    dir pointed at it would number batches over the first one's, leaving its events in no batch."""
    from conftest import write_config

    daemon = daemon_factory()
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(tmp_path / "other.toml", other, daemon.db, f'[state]\ndir = "{tmp_path / "other-state"}"')
    result = _run_once(config, "u2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"codi2: {daemon.db}: another codi2 (pid {daemon.proc.pid}) is running on this SQLite store"
    )
    assert "Traceback" not in result.stderr
    (workspace / "a.txt").write_text("a")
    wait_for(lambda: daemon.events())
    assert daemon.terminate() == 0


def test_a_store_file_that_cannot_be_opened_is_left_alone(workspace: Path, tmp_path: Path) -> None:
    """Only a corrupt journal is moved aside: with SQLite the journal is the store's file, the whole trail. A
    file SQLite opens but cannot use (here another program's database, whose `files` table is not the
    index) stops the daemon with one line and is left as it was."""
    from conftest import write_config

    db = tmp_path / "theirs.db"
    with closing(sqlite3.connect(db)) as theirs, theirs:
        theirs.execute("CREATE TABLE files (name TEXT)")
        theirs.execute("INSERT INTO files VALUES ('precious')")
    result = _run_once(write_config(tmp_path / "c.toml", workspace, db), "u1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"codi2: cannot open the journal {db}: no such column: dev"
    assert not list(tmp_path.glob("*corrupt*"))
    with closing(sqlite3.connect(db)) as theirs:
        assert theirs.execute("SELECT name FROM files").fetchall() == [("precious",)]


def test_events_limit_0_prints_nothing(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    (workspace / "a.txt").write_text("a")
    wait_for(lambda: daemon.events())
    assert daemon.terminate() == 0
    result = subprocess.run(
        [sys.executable, "-m", "codi2", "events", "--config", str(daemon.config), "--tenant-id", "t1", "--limit", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
