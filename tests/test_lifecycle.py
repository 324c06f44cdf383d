"""The daemon's life cycle in this process: what a start-up that fails half-way leaves behind.

The daemon runs here (not as a subprocess) so that its threads, descriptors and sockets can be counted
after it gave up; everything it starts is real: the health server on a socket, the journal file, the
store (SQLite, or the real `fdb` bindings over the fake libfdb_c), the journal and shipper threads.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually, write_config
from trail_checks import write_fdb_config

from codi2.config import load_settings
from codi2.daemon.build import build
from codi2.daemon.daemon import Daemon, StartupError, StateLock
from codi2.trail.events import Identity


def _open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return fds


@pytest.mark.parametrize("backend", ["sqlite", "fdb"])
async def test_a_start_up_failing_at_its_last_step_stops_everything_that_had_started(
    backend: str, tmp_path: Path, workspace: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "fdb":
        request.getfixturevalue("fdb_api")
        config = write_fdb_config(tmp_path / "codi2.toml", workspace, tmp_path / "fdb.cluster")
    else:
        config = write_config(tmp_path / "codi2.toml", workspace, tmp_path / "audit.db")
    settings = load_settings(config, tenant_id="t1", user_id="u1")
    # The watcher starts last, after the health server, the locks, the journal, the store and its threads.
    # It fails as it does when the user has used up fs.inotify.max_user_instances (a limit shared with
    # every process of the user, too racy to exhaust for real in a test).
    monkeypatch.setattr("codi2.watch.inotify.inotify_init", lambda: -1)
    daemon = Daemon(build(settings, Identity("t1", "u1", None, "pod-test")))
    daemon_fds_from = _open_fds()

    with pytest.raises(StartupError) as failed:
        await asyncio.wait_for(daemon.serve(), 60)
    assert str(failed.value) == (
        "cannot watch: cannot create an inotify instance: raise fs.inotify.max_user_instances, or the open-file"
        " limit (nofile)"
    )

    started = daemon.pipeline.journal is not None and daemon.health.port is not None
    assert started, "the failure came before the later components started: the test proves nothing"
    assert (daemon.shipper is not None) == (backend == "fdb")
    assert [t.name for t in threading.enumerate() if t.name.startswith("codi2-")] == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", daemon.health.port), timeout=5).close()
    for lock in [StateLock(settings.state_dir)] + (
        [StateLock(settings.state_dir, file=settings.sqlite_file)] if backend == "sqlite" else []
    ):
        lock.acquire()  # raises StartupError if the daemon still held it
        lock.release()
    left = {fd: target for fd, target in _open_fds().items() if fd not in daemon_fds_from}
    if backend == "fdb":  # the fake keeps the cluster's data file open for the bindings' database
        left = {fd: t for fd, t in left.items() if "fdb.cluster" not in t}
    assert left == {}


async def test_a_thread_that_dies_is_named_in_status_and_fails_liveness(
    tmp_path: Path, workspace: Path, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("fdb_api")
    config = write_fdb_config(tmp_path / "codi2.toml", workspace, tmp_path / "fdb.cluster")
    daemon = Daemon(build(load_settings(config, tenant_id="t1", user_id="u1"), Identity("t1", "u1", None, "pod-test")))
    serving = asyncio.create_task(daemon.serve())
    try:
        # Ready, and past the first start's index rebuild (degraded while it waits for the store to be readable).
        await eventually(lambda: daemon.status()["ready"] and daemon.status()["status"] == "ok")

        def fail(item: Any) -> bool:  # a bug met while shipping: the shipper thread ends with its traceback
            raise RuntimeError("injected")

        daemon.shipper._deliver = fail  # type: ignore[union-attr,method-assign]
        (workspace / "f").write_text("x")
        await eventually(lambda: not daemon.shipper.running)  # type: ignore[union-attr]
        status = daemon.status()
        assert status["status"] == "degraded"
        assert "shipper thread stopped (see the logs for the error)" in status["degraded_reasons"]
        assert not status["ready"]
    finally:
        daemon.should_exit.set()
        await asyncio.wait_for(serving, 60)


async def test_a_flush_still_running_at_the_shutdown_deadline_is_reported_not_journaled(
    tmp_path: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush longer than shutdown may wait (a huge start-up scan on a throttled CPU): the exit code and
    the log say changes were not journaled, and the journal and roots stay open under the working thread."""
    monkeypatch.setenv("CODI2_SERVER__SHUTDOWN_TIMEOUT_S", "0.01")
    config = write_config(tmp_path / "codi2.toml", workspace, tmp_path / "audit.db")
    daemon = Daemon(build(load_settings(config, tenant_id="t1", user_id="u1"), Identity("t1", "u1", None, "pod-test")))
    serving = asyncio.create_task(daemon.serve())
    pipeline = daemon.pipeline
    await eventually(lambda: daemon.status()["ready"] and daemon.status()["initial_scan"] == "done")
    inside, release = threading.Event(), threading.Event()
    flush = pipeline._flush

    def slow_flush() -> None:
        inside.set()
        release.wait(60)
        flush()

    pipeline._flush = slow_flush  # type: ignore[method-assign]
    try:
        (workspace / "f").write_text("x")
        assert await asyncio.to_thread(inside.wait, 30)
        daemon.should_exit.set()
        assert await asyncio.wait_for(serving, 60) == 1  # not 0: a change observed never reached the journal
        assert pipeline.journal is not None and pipeline._root_fds, "closed under the thread still using them"
    finally:
        release.set()
    await eventually(lambda: not pipeline.running)
    pipeline.close()
    assert pipeline._root_fds == []
