"""`codi2 events --cursor-file`: a reader that resumes exactly after the last event it printed, across
SIGKILL, on SQLite (an integer position) and on FoundationDB over the fake libfdb_c (a packed key); and the
cursor file refused wherever it does not belong. Real processes throughout: a writer adding events through
the store API, `codi2 events` readers killed and restarted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import fakefdb
import pytest
from conftest import WAIT_S, run_codi2, wait_for

from codi2.cli.cursor import decode, encode

WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from sink_contract import batch_of, make_event
from codi2.config import load_settings
from codi2.stores.open import open_sink

config, total, tenant = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sink = open_sink(load_settings(Path(config), tenant_id=tenant))
written = 0
while written < total:
    n = min(total - written, 1 + written % 13)
    sink.write_batch(batch_of(*[make_event(f"f{written + i:05d}", tenant=tenant) for i in range(n)]))
    written += n
    time.sleep(0.002)
sink.close()
"""


class Store:
    """A store for the test, named by a config file, and the environment its processes need."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config, self.env = config, env

    def write(self, total: int, tenant: str = "t1") -> subprocess.Popen[bytes]:
        args = [str(self.config), str(total), tenant, str(Path(__file__).parent)]
        return subprocess.Popen([sys.executable, "-c", WRITER, *args], env={**os.environ, **self.env})

    def events(self, *args: str, tenant: str = "t1") -> subprocess.CompletedProcess[str]:
        return run_codi2("events", "--config", str(self.config), "--tenant-id", tenant, *args, env=self.env)

    def reader(self, out: Path, *args: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "codi2", "events", "--config", str(self.config), "--tenant-id", "t1", *args]
        with out.open("wb") as stdout:
            return subprocess.Popen(argv, stdout=stdout, env={**os.environ, **self.env})

    def trail(self) -> list[str]:
        return [json.loads(line)["id"] for line in self.events("--format", "jsonl").stdout.splitlines()]


def sqlite_store(tmp_path: Path) -> Store:
    tmp_path.mkdir(exist_ok=True)
    config = tmp_path / "codi2.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(tmp_path / "audit.db"))}\n')
    return Store(config, {})


@pytest.fixture
def sqlite(tmp_path: Path) -> Store:
    return sqlite_store(tmp_path)


@pytest.fixture(params=["sqlite", "fdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return sqlite_store(tmp_path)
    lib_dir: Path = request.getfixturevalue("fake_libfdb_c")
    cluster = tmp_path / "fdb.cluster"
    cluster.write_text("test:fake@127.0.0.1:4500\n")
    config = tmp_path / "codi2.toml"
    config.write_text(f"[foundationdb]\ncluster_file = {json.dumps(str(cluster))}\n")
    return Store(config, fakefdb.child_env(lib_dir, tmp_path / "fdb.sqlite"))


def _printed(reader: subprocess.Popen[bytes], out: Path) -> int:
    """Lines the reader has printed so far; it must still be running."""
    assert reader.poll() is None, f"the reader exited with {reader.returncode}"
    return len(out.read_text().splitlines())


def test_a_reader_killed_five_times_mid_stream_prints_every_event_once_in_order(store: Store, tmp_path: Path) -> None:
    """Each restart resumes after the last line the killed run flushed; a kill between a line's flush and its
    cursor's write reprints that one line (the documented window), never more, and nothing is ever lost."""
    rng = random.Random(24)
    cursor = tmp_path / "reader.cursor"
    writer = store.write(1200)
    wait_for(lambda: store.events("--limit", "1").stdout)  # the store exists
    runs: list[list[str]] = []
    for kill in range(5):
        out = tmp_path / f"run{kill}.jsonl"
        reader = store.reader(out, "--follow", "--cursor-file", str(cursor), "--format", "ocsf")
        target = rng.randint(1, 200)
        wait_for(lambda: _printed(reader, out) >= target, interval=0.005)  # noqa: B023
        reader.send_signal(signal.SIGKILL)
        reader.wait(WAIT_S)
        runs.append([json.loads(line)["metadata"]["uid"] for line in out.read_text().splitlines()])
    assert writer.wait(WAIT_S * 2) == 0
    last = tmp_path / "last.jsonl"
    assert store.reader(last, "--cursor-file", str(cursor), "--format", "ocsf").wait(WAIT_S) == 0  # drains, exits
    runs.append([json.loads(line)["metadata"]["uid"] for line in last.read_text().splitlines()])

    trail = store.trail()
    assert len(trail) == 1200
    printed = [event_id for run in runs for event_id in run]
    deduped = [event_id for i, event_id in enumerate(printed) if event_id not in printed[:i]]
    assert deduped == trail  # every event, in order
    for i in range(1, len(runs)):  # the only repeat a restart may print: the last line the killed run flushed
        earlier, run = {e for r in runs[:i] for e in r}, runs[i]
        assert not set(run[1:]) & earlier
        assert run[:1] == runs[i - 1][-1:] or not set(run[:1]) & earlier


def test_without_follow_it_prints_what_is_after_the_cursor_and_exits(store: Store, tmp_path: Path) -> None:
    cursor = tmp_path / "cron.cursor"
    assert store.write(30).wait(WAIT_S) == 0
    first = store.events("--cursor-file", str(cursor), "--limit", "12")
    assert first.returncode == 0, first.stderr
    saved = json.loads(cursor.read_text())
    assert saved["tenant_id"] == "t1" and saved["cursor_type"] in ("int", "bytes")
    assert saved["last_id"] == json.loads(first.stdout.splitlines()[-1])["id"]
    rest = store.events("--cursor-file", str(cursor), "--format", "ecs")
    assert rest.returncode == 0, rest.stderr
    assert store.events("--cursor-file", str(cursor)).stdout == ""  # nothing new: nothing printed
    assert store.write(5).wait(WAIT_S) == 0
    new = store.events("--cursor-file", str(cursor))
    printed = [json.loads(line)["id"] for line in first.stdout.splitlines()]
    printed += [json.loads(line)["event"]["id"] for line in rest.stdout.splitlines()]
    printed += [json.loads(line)["id"] for line in new.stdout.splitlines()]
    assert printed == store.trail()


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2 and result.stdout == ""
    assert all(word in result.stderr for word in words), result.stderr


def test_a_cursor_file_is_never_applied_to_another_trail(sqlite: Store, tmp_path: Path) -> None:
    cursor = tmp_path / "reader.cursor"
    assert sqlite.write(3).wait(WAIT_S) == 0
    assert sqlite.write(2, tenant="t2").wait(WAIT_S) == 0
    assert sqlite.events("--cursor-file", str(cursor)).returncode == 0
    _refused(sqlite.events("--cursor-file", str(cursor), tenant="t2"), "tenant_id", "'t1'")

    other = sqlite_store(tmp_path / "other")  # another store, holding t1 too
    assert other.write(3).wait(WAIT_S) == 0
    _refused(other.events("--cursor-file", str(cursor)), "store", "audit.db")

    (tmp_path / "audit.db").unlink()  # the same store recreated: positions start over
    assert sqlite.write(8).wait(WAIT_S) == 0
    _refused(sqlite.events("--cursor-file", str(cursor)), "trail", "replaced")

    cursor.write_text("{not json")
    _refused(sqlite.events("--cursor-file", str(cursor)), "not a cursor file")
    _refused(sqlite.events("--cursor-file", str(cursor), "--replay"), "--replay")
    _refused(sqlite.events("--format", "ocsf", "--replay"), "--replay")


def test_a_second_reader_on_the_same_cursor_file_stops_at_once(sqlite: Store, tmp_path: Path) -> None:
    cursor = tmp_path / "reader.cursor"
    assert sqlite.write(3).wait(WAIT_S) == 0
    out = tmp_path / "first.jsonl"
    first = sqlite.reader(out, "--follow", "--cursor-file", str(cursor))
    try:
        wait_for(lambda: len(out.read_text().splitlines()) == 3)
        second = sqlite.events("--cursor-file", str(cursor))
        assert second.returncode == 1 and second.stdout == ""
        assert "in use by another reader" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(WAIT_S)
    assert sqlite.events("--cursor-file", str(cursor)).returncode == 0  # the kernel released the lock


@pytest.mark.parametrize("cursor", [0, 1, 2**40, b"", b"\x01\x15codi2\x00\xff" * 3])
def test_cursors_round_trip_through_the_file_s_hex(cursor: int | bytes) -> None:
    data = encode(cursor)
    assert decode(json.loads(json.dumps(data))) == cursor
