"""`codi2 run` on FoundationDB: a real subprocess on the real `fdb` bindings over the fake libfdb_c, with
faults the library injects (FAKEFDB_FAULTS), an outage (`<data>.down`) and a kill; the trail is read back
with `codi2 events`. Every event lands exactly once, and /status keeps answering with the error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import fakefdb
import pytest
from conftest import WAIT_S, DaemonProcess, wait_for
from trail_checks import run_verify

from codi2.trail.events import Event

Start = Callable[..., DaemonProcess]


@pytest.fixture
def config(tmp_path: Path, workspace: Path) -> Path:
    cluster = tmp_path / "fdb.cluster"
    cluster.write_text("test:fake@127.0.0.1:4500\n")  # never read by the fake; `codi2 test` parses it
    path = tmp_path / "codi2.toml"
    path.write_text(
        f"""
[server]
bind_addr = "127.0.0.1:0"
[foundationdb]
cluster_file = {json.dumps(str(cluster))}
transaction_timeout_ms = 500
[monitoring]
watch_paths = [{json.dumps(str(workspace))}]
[batching]
max_events = 5
max_delay_ms = 20
[logging]
level = "debug"
format = "json"
"""
    )
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "fdb.sqlite"


@pytest.fixture
def start(config: Path, data: Path, fake_libfdb_c: Path, spawned: Callable[[DaemonProcess], DaemonProcess]) -> Start:
    def start(faults: str = "", seed: int = 1, *, settle: bool = True) -> DaemonProcess:
        env = fakefdb.child_env(fake_libfdb_c, data, faults, seed)
        return spawned(DaemonProcess(config, data, env, settle=settle))

    return start


def stored(config: Path, data: Path, lib_dir: Path) -> list[Event]:
    """The tenant's trail as `codi2 events` prints it, read through the fake in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-m", "codi2", "events", "--config", str(config), "--tenant-id", "t1", "--format", "jsonl"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=True,
        env={**os.environ, **fakefdb.child_env(lib_dir, data)},
    )
    return [Event.from_json(line) for line in result.stdout.splitlines()]


def created(config: Path, data: Path, lib_dir: Path) -> Counter[str]:
    return Counter(e.path for e in stored(config, data, lib_dir) if e.action == "created")


def test_every_event_lands_exactly_once_through_faults_and_an_outage(
    workspace: Path, config: Path, data: Path, fake_libfdb_c: Path, start: Start
) -> None:
    daemon = start("1020:0.15,1021_before:0.1,1021_after:0.15,1031_after:0.1,1007:0.1", seed=3)
    for i in range(30):
        (workspace / f"a{i}.txt").write_text("a")
    wait_for(lambda: len(created(config, data, fake_libfdb_c)) == 30)

    down = Path(f"{data}.down")
    down.touch()  # the cluster goes away: every commit times out
    for i in range(30):
        (workspace / f"b{i}.txt").write_text("b")

    def degraded() -> dict | None:
        store = daemon.status()["store"]
        return store if store["state"] == "degraded" else None

    store = wait_for(degraded)
    assert store["error_code"] == "fdb_1031" and store["error"].endswith("(1031)")
    assert daemon.get("/readyz")[0] == 200
    down.unlink()

    wait_for(lambda: len(created(config, data, fake_libfdb_c)) == 60)
    wait_for(lambda: daemon.status()["store"]["state"] == "ok")
    assert daemon.terminate() == 0
    paths = created(config, data, fake_libfdb_c)
    assert set(paths) == {f"{p}{i}.txt" for p in "ab" for i in range(30)}
    assert set(paths.values()) == {1}
    assert sum(fakefdb.counters(data)["faults"].values()) > 0


def test_an_unnamed_error_code_is_shown_and_the_batch_kept_across_a_kill(
    workspace: Path, config: Path, data: Path, fake_libfdb_c: Path, start: Start
) -> None:
    daemon = start("4242:1", settle=False)  # every commit fails with a code FoundationDB does not define
    wait_for(lambda: daemon.status()["initial_scan"] == "done")
    for i in range(5):
        (workspace / f"f{i}.txt").write_text("f")
    # The five (a file's write may be seen apart from its creation: `updated` too) and the run's two `start`s.
    wait_for(lambda: (s := daemon.status())["spool"]["events"] >= 7 and s["pipeline"]["pending_changes"] == 0)

    def failed() -> dict | None:  # the shipper's first try may come after the journal's commit is seen
        status, body = daemon.get("/status")
        assert status == 200
        store = json.loads(body)["store"]
        return store if store["state"] != "unknown" else None

    store = wait_for(failed)
    assert store["state"] == "degraded" and store["error_code"] == "fdb_4242"
    assert store["error"] == "fdb: Unknown error (4242)"  # the fake's description, decoded
    assert 'codi2_store_errors_total{error="fdb_4242"}' in daemon.get("/metrics")[1]
    daemon.kill()

    daemon = start()  # the store is back: the spooled batch is committed, once
    wait_for(lambda: len(created(config, data, fake_libfdb_c)) == 5)
    assert daemon.terminate() == 0
    assert created(config, data, fake_libfdb_c) == Counter(f"f{i}.txt" for i in range(5))


def test_the_trail_verifies_across_faults_an_outage_a_kill_and_restarts(
    workspace: Path, config: Path, data: Path, fake_libfdb_c: Path, start: Start
) -> None:
    daemon = start("1020:0.1,1021_after:0.15,1031_after:0.1", seed=7)
    for i in range(15):
        (workspace / f"a{i}.txt").write_text("a")
    wait_for(lambda: len(created(config, data, fake_libfdb_c)) == 15)
    down = Path(f"{data}.down")
    down.touch()  # the cluster goes away, and the daemon is killed while batches wait in its outbox
    for i in range(15):
        (workspace / f"b{i}.txt").write_text("b")
    wait_for(lambda: daemon.status()["spool"]["events"] >= 15)
    daemon.kill()
    down.unlink()

    daemon = start("1021_after:0.2", seed=8)
    (workspace / "c.txt").write_text("c")
    wait_for(lambda: len(created(config, data, fake_libfdb_c)) == 31)
    assert daemon.terminate() == 0
    daemon = start()  # and once more, with nothing to add
    chain = daemon.status()["chain"]
    assert daemon.terminate() == 0

    code, report, stderr = run_verify(config, "--disk", str(workspace), env=fakefdb.child_env(fake_libfdb_c, data))
    assert code == 0, (report, stderr)
    [stream] = report["streams"]
    assert (stream["stream_id"], stream["head_batch"], stream["head_link"]) == (
        chain["stream_id"],
        chain["batches"],
        chain["head"],
    )
    assert stream["events"] == report["trail_events"] == len(stored(config, data, fake_libfdb_c))
    assert report["disk"]["entries"] == 31 and report["disk"]["differences"] == []
