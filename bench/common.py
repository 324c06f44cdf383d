"""Shared pieces of the benchmarks: codi2 and inotifywait as measured subprocesses, /proc readings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
INOTIFY_EVENTS = "create,modify,close_write,attrib,moved_from,moved_to,delete"


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wakeups(pid: int) -> int:
    """Context switches of every thread: each is the process waking up (or being preempted)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def inotify_watches(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            count += sum(1 for line in fd.read_text().splitlines() if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


def ensure_tool(binary: str, package: str) -> str:
    """The baseline's binary, installed from Debian's package when missing (root, apt)."""
    found = shutil.which(binary)
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, capture_output=True)
        found = shutil.which(binary)
    if not found:
        sys.exit(f"bench: {binary} not found; install Debian's {package}")
    return found


def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Seconds until `predicate()` held; raises on timeout."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError("bench: condition not met")
        time.sleep(interval)
    return time.monotonic() - started


class Codi2:
    """`codi2 run` on SQLite in `base`, with a fresh state dir and store every time."""

    def __init__(self, base: Path, workspace: Path, *, max_delay_ms: int = 200, extra_env: dict | None = None) -> None:
        self.db = base / "audit.db"
        self.state = base / "state"
        for path in (self.state, self.db, Path(f"{self.db}-wal"), Path(f"{self.db}-shm")):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        config = base / "codi2.toml"
        config.write_text(
            f'[server]\nbind_addr = "127.0.0.1:0"\n[monitoring]\nwatch_paths = [{json.dumps(str(workspace))}]\n'
            f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(self.db))}\n'
            f"[state]\ndir = {json.dumps(str(self.state))}\n[batching]\nmax_delay_ms = {max_delay_ms}\n"
            '[logging]\nlevel = "info"\nformat = "json"\n'
        )
        self.log = base / "codi2.log"
        self.started = time.monotonic()
        with open(self.log, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "codi2", "--config", str(config), "--user-id", "bench", "--tenant-id", "bench"],
                stderr=stderr,
                stdout=subprocess.DEVNULL,
                env={**os.environ, **(extra_env or {})},
            )
        self.pid = self.proc.pid
        self.port = self._port()

    def _port(self) -> int:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if '"codi2_ready"' in line:
                    return json.loads(line)["health_port"]
            if self.proc.poll() is not None:
                sys.exit(f"bench: codi2 exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.01)
        sys.exit("bench: codi2 did not start")

    def ready_seconds(self) -> float:
        """From the process start to /readyz 200."""

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        poll_until(ready, 120, interval=0.005)
        return time.monotonic() - self.started

    def query(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.db, timeout=10) as conn:
            return conn.execute(sql).fetchall()

    def count_files(self) -> int:
        """Files recorded as created (a `/` in the path: the burst's files, not its directories)."""
        return self.query("SELECT count(*) FROM events WHERE action = 'created' AND instr(path, '/') > 0")[0][0]

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=5) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class InotifyWait:
    """`inotifywait -m -r` on the same tree; `established` is its own "Watches established." moment."""

    def __init__(self, binary: str, tree: Path, out: Path) -> None:
        self.out = out
        self.started = time.monotonic()
        self._stdout = open(out, "w")  # noqa: SIM115 - closed in stop()
        self._stderr_path = out.with_suffix(".err")
        self._stderr = open(self._stderr_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "-m", "-r", "-e", INOTIFY_EVENTS, "--format", "%e %w%f", str(tree)],
            stdout=self._stdout,
            stderr=self._stderr,
        )
        self.pid = self.proc.pid
        poll_until(lambda: "Watches established" in self._stderr_path.read_text(), 120, interval=0.002)
        self.established = time.monotonic() - self.started

    def created(self) -> int:
        with open(self.out, "rb") as f:
            return sum(1 for line in f if line.startswith(b"CREATE "))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._stdout.close()
        self._stderr.close()


class Watchman:
    """Debian's watchman 4.9, a server of its own (private socket and state) watching `tree`. Its cost
    comparable to codi2's is until a `since` query returns every file with its content hash."""

    def __init__(self, binary: str, base: Path, tree: Path) -> None:
        self.binary = binary
        self.dir = base / "watchman"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir()
        self.tree = str(tree)
        self._args = [
            binary,
            "--sockname",
            str(self.dir / "sock"),
            "--statefile",
            str(self.dir / "state"),
            "--logfile",
            str(self.dir / "log"),
            "--pidfile",
            str(self.dir / "pid"),
            "--no-save-state",
        ]
        self.pid = self.call(["get-pid"])["pid"]
        self.call(["watch", self.tree])
        self.clock = self.call(["clock", self.tree])["clock"]

    def call(self, command: list) -> dict:
        out = subprocess.run([*self._args, "-j"], input=json.dumps(command), capture_output=True, check=True, text=True)
        return json.loads(out.stdout)

    def hashed(self) -> int:
        """Files the server reports, since the start, with their sha1."""
        result = self.call(
            [
                "query",
                self.tree,
                {"since": self.clock, "fields": ["name", "content.sha1hex"], "expression": ["type", "f"]},
            ]
        )
        return sum(1 for f in result.get("files", []) if isinstance(f.get("content.sha1hex"), str))

    def stop(self) -> None:
        subprocess.run([*self._args, "shutdown-server"], capture_output=True, check=False)
