"""Shared fixtures: real temp trees, the daemon as a real subprocess, its store read back for real."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import fakefdb
import hypothesis
import pytest
from hypothesis import settings

from codi2.config import MonitoringSettings
from codi2.disk.ignore import IgnoreRules
from codi2.stores.sqlite import SqliteSink
from codi2.trail.events import LIFECYCLE, Event, EventQuery
from codi2.trail.replay import Entry, read_disk

WAIT_S = 60.0  # generous upper bound for conditions; tests poll and never depend on timing
HASH_MAX = MonitoringSettings.model_fields["hash_max_bytes"].default
# Hypothesis fails an example slower than 200 ms by default: on a shared 2-core machine that is timing.
settings.register_profile("codi2", deadline=None)
settings.load_profile("codi2")

# Tests never depend on timing: no example fails for taking long on a loaded machine.
hypothesis.settings.register_profile("codi2", deadline=None)
hypothesis.settings.load_profile("codi2")


def run_codi2(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m codi2 ARGS` in a process of its own, output captured, whatever its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "codi2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
        env={**os.environ, **(env or {})},
    )


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT_S, interval: float = 0.05) -> Any:
    """Poll until `predicate` is truthy; fail the test with its last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


async def eventually(predicate: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """`wait_for` for tests that run the daemon in their own event loop."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.02)
    return value


def read_events(db: Path, tenant: str = "t1", *, lifecycle: bool = False) -> list[Event]:
    """The workspace's events in commit order; with `lifecycle`, the daemon's own `start`/`stop` records too."""
    if not db.exists():
        return []
    sink = SqliteSink(db, create=False)
    try:
        return [event for _, event in sink.read(EventQuery(tenant)) if lifecycle or event.action not in LIFECYCLE]
    finally:
        sink.close()


def write_config(path: Path, workspace: Path, db: Path, extra: str = "") -> Path:
    path.write_text(
        f"""
[server]
bind_addr = "127.0.0.1:0"
[monitoring]
watch_paths = [{json.dumps(str(workspace))}]
ignore_patterns = [".git", "node_modules", "target", "dist"]
[storage]
backend = "sqlite"
sqlite_path = {json.dumps(str(db))}
[batching]
max_delay_ms = 50
[logging]
level = "debug"
format = "json"
{extra}
"""
    )
    return path


class DaemonProcess:
    """`codi2 run` as a subprocess; learns its health port from the JSON `codi2_ready` log line."""

    def __init__(
        self,
        config: Path,
        db: Path,
        env: dict[str, str] | None = None,
        wrapper: tuple[str, ...] = (),
        *,
        settle: bool = True,
    ) -> None:
        self.config = config
        self.db = db
        self.logs: list[dict[str, Any]] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "codi2", "--config", str(config), "--user-id", "u1", "--tenant-id", "t1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "HOSTNAME": "pod-test", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        if not self._ready.wait(WAIT_S):
            self.proc.kill()
            raise AssertionError(f"daemon not ready; logs: {self.logs[-20:]}")
        if self.port is None:
            raise AssertionError(f"daemon exited early; logs: {self.logs[-20:]}")
        if settle:  # ready means watched; most tests also want the start-up diff behind them
            try:
                wait_for(lambda: (s := self.status())["initial_scan"] == "done" and s["spool"]["events"] == 0)
            except AssertionError:
                status = self.status()
                self.kill()  # not yet handed to the test's `spawned` list: nothing else would end it
                raise AssertionError(f"start-up diff never done: {status}; logs {self.logs[-20:]}") from None

    def _read_logs(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "raw", "text": raw.decode(errors="replace")}
            self.logs.append(line)
            if line.get("event") == "codi2_ready":
                self.port = line["health_port"]
                self._ready.set()
        self._ready.set()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/status")[1])

    def events(self) -> list[Event]:
        return read_events(self.db)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process has ended and its last log lines are read."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if line.get("event") == event]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def fake_libfdb_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the fake libfdb_c.so, built for this session (skipped, with the reason, where it cannot be)."""
    return fakefdb.build(tmp_path_factory.mktemp("fakelibfdb"))


@pytest.fixture(scope="session")
def fdb_api(fake_libfdb_c: Path) -> ModuleType:
    """The real `fdb` bindings, on the fake libfdb_c in this process."""
    return fakefdb.load_in_process(fake_libfdb_c)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    return ws


D = TypeVar("D", bound=DaemonProcess)


@pytest.fixture
def spawned() -> Iterator[Callable[[D], D]]:
    """Keeps every daemon a test starts (`spawned(DaemonProcess(...))`) and kills it when the test ends,
    whatever the test did: the one teardown behind each fixture that starts daemons."""
    started: list[DaemonProcess] = []

    def keep(daemon: D) -> D:
        started.append(daemon)
        return daemon

    yield keep
    for daemon in started:
        daemon.kill()


@pytest.fixture
def daemon_factory(
    tmp_path: Path, workspace: Path, spawned: Callable[[DaemonProcess], DaemonProcess]
) -> Callable[..., DaemonProcess]:
    def start(
        extra: str = "", env: dict[str, str] | None = None, wrapper: tuple[str, ...] = (), settle: bool = True
    ) -> DaemonProcess:
        db = tmp_path / "audit.db"
        config = write_config(tmp_path / "codi2.toml", workspace, db, extra)
        return spawned(DaemonProcess(config, db, env, wrapper, settle=settle))

    return start


Ignored = Callable[[str, bool], bool]


def folds_to(trail: dict[tuple[str, str], Entry], disk: dict[tuple[str, str], Entry]) -> bool:
    """Whether a trail's fold is the disk where the trail knows it: a trail begun before events carried
    owners (0.1's, version 1 records) has entries without them, as `codi2 verify --disk` allows."""
    return trail.keys() == disk.keys() and all(entry.matches(disk[key]) for key, entry in trail.items())


def disk_state(
    root: Path,
    ignores: tuple[str, ...] = (".git", "node_modules", "target", "dist", ".codi2"),
    ignored: Ignored | None = None,
) -> dict[tuple[str, str], Entry]:
    """What a complete trail must fold to: every entry below `root` the daemon's own walk
    (`codi2.disk.walk`) keeps under the ignore patterns `ignores`, files hashed up to the default
    `hash_max_bytes`. `ignored(rel, is_dir)` leaves out more: path-dependent rules, the daemon's own
    places under another name."""
    rules = IgnoreRules(ignores, [root])
    state = read_disk(root, rules, HASH_MAX).state
    if ignored is None:
        return state
    return {key: entry for key, entry in state.items() if not ignored(key[1], entry.type == "dir")}
