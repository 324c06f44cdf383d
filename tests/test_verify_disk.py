"""`codi2 verify --disk` reads the disk exactly as the daemon does (`codi2.disk.walk`), with real files and
a real `codi2 verify` process: what a workspace user can plant (a FIFO, a device node, a socket, a file
over `hash_max_bytes`, a sparse file of any size) neither hangs, crashes nor misleads the check, and what
the check may not read (another user's files, /proc) is reported, never fatal."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import WAIT_S, DaemonProcess, write_config
from trail_checks import nonroot, run_verify, shared_tmp

Start = Callable[..., DaemonProcess]
HASH_MAX = 1024
ENV = {"CODI2_MONITORING__HASH_MAX_BYTES": str(HASH_MAX)}
SPARSE_BYTES = 512 << 20
# `codi2 verify` run in a process of its own that writes its /proc/self/io on the way out: how many bytes
# its read calls returned, file contents and everything else.
COUNTING_READS = """
import atexit, sys
out = sys.argv.pop(1)
def record():
    with open("/proc/self/io") as io, open(out, "w") as f:
        f.write(io.read())
atexit.register(record)
from codi2.cli.main import main
sys.exit(main())
"""


def _plant_fifos(ws: Path) -> None:
    os.mkfifo(ws / "pipe")  # nobody writes: opening it to read would wait forever
    os.mkfifo(ws / "pipe-with-writer")


def _plant_device(ws: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    os.mknod(ws / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def _plant_socket(ws: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(ws)  # a relative name: the temp path may be longer than sun_path takes
    try:
        sock.bind("sock")
    finally:
        os.chdir(cwd)
        sock.close()


def _plant_big_files(ws: Path) -> None:
    (ws / "over-the-limit.bin").write_bytes(b"x" * (2 * HASH_MAX))
    with open(ws / "sparse.img", "wb") as f:
        f.truncate(SPARSE_BYTES)


PLANTS = {"fifo": _plant_fifos, "device": _plant_device, "socket": _plant_socket, "big": _plant_big_files}


def _verify_counting_reads(config: Path, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str, int]:
    """`codi2 verify --json ARGS`: exit code, report, stderr, and the bytes its reads returned."""
    io = tmp_path / "verify.io"
    command = ["verify", "--config", str(config), "--tenant-id", "t1", "--json", *args]
    result = subprocess.run(
        [sys.executable, "-c", COUNTING_READS, str(io), *command],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
        env={**os.environ, **ENV},
    )
    counters = dict(line.split(": ") for line in io.read_text().splitlines())
    return result.returncode, json.loads(result.stdout) if result.stdout else {}, result.stderr, int(counters["rchar"])


@pytest.mark.parametrize("plant", PLANTS)
def test_verify_disk_reads_what_a_user_plants_as_the_daemon_does(
    plant: str, workspace: Path, tmp_path: Path, daemon_factory: Start
) -> None:
    (workspace / "small.txt").write_text("within the limit")
    PLANTS[plant](workspace)
    daemon = daemon_factory(env=ENV)  # the start-up diff records everything planted
    recorded = {e.path: e for e in daemon.events()}
    assert set(os.listdir(workspace)) - {".codi2"} <= recorded.keys()
    assert daemon.terminate() == 0
    writer = None
    if plant == "fifo":  # blocked until someone opens the FIFO to read: the check must not be that one
        code = "import sys; open(sys.argv[1], 'wb').write(b'released')"
        writer = subprocess.Popen([sys.executable, "-c", code, str(workspace / "pipe-with-writer")])
    try:
        code, report, stderr, read = _verify_counting_reads(daemon.config, tmp_path, "--disk", str(workspace))
        assert code == 0 and report["ok"], (stderr, report)
        assert report["disk"] == {
            "path": str(workspace),
            "root": str(workspace),
            "user_id": None,
            "entries": len(recorded),
            "differences": [],
            "unreadable": 0,
            "unreadable_listed": [],
        }
        assert writer is None or writer.poll() is None, "verify opened the FIFO: its writer was released"
        assert read < SPARSE_BYTES, f"verify read {read} bytes: it hashed a file over hash_max_bytes"
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
    if plant == "big":
        assert recorded["over-the-limit.bin"].sha256 is None and recorded["sparse.img"].sha256 is None
        assert recorded["sparse.img"].size == SPARSE_BYTES


def test_verify_disk_of_proc_reports_what_cannot_be_read_and_goes_on(workspace: Path, daemon_factory: Start) -> None:
    """What `--disk /` meets in /proc, bounded to the check's own process: files that fail to read (mem:
    EIO) and files of size 0 that yield without end (pagemap)."""
    (workspace / "a.txt").write_text("a")
    daemon = daemon_factory(env=ENV)
    assert daemon.terminate() == 0
    code, report, stderr = run_verify(daemon.config, "--disk", "/proc/self", env=ENV)
    assert code == 1 and report, stderr  # a report, not a crash: the disk is not the workspace
    disk = report["disk"]
    assert disk["path"] == "/proc/self" and disk["root"] == str(workspace)  # the trail's only root
    unreadable = {x["path"]: x["problem"] for x in disk["unreadable_listed"]}
    assert "could not be read" in unreadable["mem"] and "could not be read" in unreadable["pagemap"]
    assert disk["unreadable"] >= len(unreadable) >= 2
    found = {(x["kind"], x["path"]) for x in disk["differences"]}
    assert {("not_on_disk", "a.txt"), ("not_in_trail", "status"), ("not_in_trail", "task")} <= found
    assert not [x for x in disk["differences"] if x["path"] in unreadable and x["kind"] == "differs"]


def test_verify_disk_as_another_user_reports_what_it_may_not_read_and_compares_the_rest(
    spawned: Callable[[DaemonProcess], DaemonProcess],
) -> None:
    """The daemon (root) recorded everything; the operator's check runs as a user who may not list one
    directory, may not look into another, nor read one file: those are listed, the rest is compared."""
    wrapper, why = nonroot()
    if wrapper is None:
        pytest.skip(why)
    base = shared_tmp("codi2-verify-")
    try:
        _check_as(wrapper, base, spawned)
    finally:
        shutil.rmtree(base)


def _check_as(wrapper: tuple[str, ...], base: Path, spawned: Callable[[DaemonProcess], DaemonProcess]) -> None:
    ws = base / "ws"
    ws.mkdir()
    (ws / "open.txt").write_text("anyone may read this")
    (ws / "secret.txt").write_text("root only")
    (ws / "secret.txt").chmod(0o600)
    for name in ("locked", "unsearchable"):
        (ws / name).mkdir()
        (ws / name / "inside.txt").write_text(name)
    (ws / "locked").chmod(0o700)
    (ws / "unsearchable").chmod(0o744)  # others may list its names, not look at what they are
    db = base / "audit.db"
    config = write_config(base / "codi2.toml", ws, db)
    daemon = spawned(DaemonProcess(config, db))
    assert {"secret.txt", "locked/inside.txt", "unsearchable/inside.txt"} <= {e.path for e in daemon.events()}
    assert daemon.terminate() == 0
    for p in base.iterdir():
        if p.name.startswith("audit.db"):
            os.chown(p, *(2 * [os.stat(base).st_uid]))
    command = ["verify", "--config", str(config), "--tenant-id", "t1", "--json", "--disk", str(ws)]
    result = subprocess.run(
        [*wrapper, sys.executable, "-m", "codi2", *command],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    report = json.loads(result.stdout) if result.stdout else {}
    assert result.returncode == 0 and report["ok"], (result.stderr, report)
    disk = report["disk"]
    assert disk["differences"] == [] and disk["unreadable"] == 3
    assert {x["path"]: x["problem"] for x in disk["unreadable_listed"]} == {
        "locked": "its entries could not be listed",
        "secret.txt": "its contents could not be read (not permitted, or past hash_max_bytes)",
        "unsearchable/inside.txt": "could not be examined",
    }
