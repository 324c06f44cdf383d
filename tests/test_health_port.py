"""The health port under a misbehaving local client (issue #22, 7): its connections are capped and slow requests
time out, so they can never take the descriptors the journal, the store and the watcher need."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, wait_for
from trail_checks import final_check

from codi2.daemon.health import HEADER_TIMEOUT_S, MAX_CONNECTIONS

PRLIMIT = shutil.which("prlimit")
Start = Callable[..., DaemonProcess]


def _half_sent(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # never finished
    return conn


def _connections(pid: int, port: int) -> int:
    """Established TCP connections the daemon holds on its health port (from /proc/PID/net/tcp)."""
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


@pytest.mark.skipif(PRLIMIT is None, reason="prlimit (util-linux) is not installed")
def test_idle_half_sent_requests_never_starve_the_daemon(workspace: Path, daemon_factory: Start) -> None:
    """306 idle half-sent requests starved a daemon with a 256-descriptor limit: journal and store writes failed
    with EMFILE and /status timed out. Now 400 of them cost at most MAX_CONNECTIONS descriptors, /status answers
    while they are held, and files written meanwhile reach the trail."""
    ws = workspace
    daemon = daemon_factory(wrapper=(str(PRLIMIT), "--nofile=256:256", "--"))
    assert daemon.port is not None
    conns = []
    try:
        for _ in range(400):
            try:
                conns.append(_half_sent(daemon.port))
            except OSError:  # the kernel's accept backlog is full: the attacker's problem, not ours
                break
        for i in range(50):
            (ws / f"f{i}.txt").write_text(f"written while the port is flooded {i}\n")
        wait_for(lambda: daemon.status()["status"] == "ok")  # a probe gets in: it evicts the oldest idle one
        assert _connections(daemon.proc.pid, daemon.port) <= MAX_CONNECTIONS
        events = final_check(daemon, ws)
    finally:
        for conn in conns:
            conn.close()
    assert {f"f{i}.txt" for i in range(50)} <= {e.path for e in events if e.action == "created"}
    assert not [line for line in daemon.logs if "Too many open files" in str(line)]


def test_a_slow_request_is_closed_after_the_header_timeout(workspace: Path, daemon_factory: Start) -> None:
    daemon = daemon_factory()
    assert daemon.port is not None
    conn = _half_sent(daemon.port)
    started = time.monotonic()
    conn.settimeout(HEADER_TIMEOUT_S * 6)
    try:
        assert conn.recv(1024) == b""  # closed by the daemon, without a response
    finally:
        conn.close()
    assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9
    status, _ = daemon.get("/livez")
    assert status == 200


def test_keep_alive_clients_still_get_answers(workspace: Path, daemon_factory: Start) -> None:
    """A scraper reusing one connection is served on it for as long as it keeps asking."""
    daemon = daemon_factory()
    assert daemon.port is not None
    with socket.create_connection(("127.0.0.1", daemon.port)) as conn:
        conn.settimeout(10)
        for _ in range(3):
            conn.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b"ok"):
                chunk = conn.recv(4096)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")


@pytest.mark.skipif(PRLIMIT is None, reason="prlimit (util-linux) is not installed")
def test_a_flood_never_starves_a_daemon_with_few_descriptors(workspace: Path, daemon_factory: Start) -> None:
    """With 48 descriptors (about 20 in use at rest), a local process re-opening half-sent requests as fast as
    they are closed took every free descriptor with the 32 the port allowed (and more in each accept burst):
    the watcher, the journal and the store failed with EMFILE and a gap was recorded. The port's share now
    follows the limit, so nested directories and files written during the flood reach the trail, gap-free."""
    ws = workspace
    daemon = daemon_factory(wrapper=(str(PRLIMIT), "--nofile=48:48", "--"))
    port = daemon.port
    assert port is not None
    stop = threading.Event()

    def flood() -> None:
        held: list[socket.socket] = []
        while not stop.is_set():
            try:
                held.append(_half_sent(port))
            except OSError:
                stop.wait(0.01)
            if len(held) > 100:
                held.pop(0).close()
        for conn in held:
            conn.close()

    flooders = [threading.Thread(target=flood) for _ in range(2)]
    for thread in flooders:
        thread.start()
    try:
        for i in range(20):
            deep = ws.joinpath(f"t{i}", *[f"d{k}" for k in range(8)])
            deep.mkdir(parents=True)
            for j in range(5):
                (deep / f"f{j}").write_text(f"{i} {j}\n")
        wait_for(lambda: sum(1 for e in daemon.events() if e.path.endswith("/f4")) == 20)
    finally:
        stop.set()
        for thread in flooders:
            thread.join()
    events = final_check(daemon, ws)
    assert not [e for e in events if e.action == "gap"]
    assert not [line for line in daemon.logs if "Too many open files" in str(line)]
