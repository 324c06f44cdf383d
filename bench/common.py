"""Shared pieces of the benchmarks: codi2 (on SQLite, or on FoundationDB over the fake libfdb_c),
inotifywait and watchman as measured subprocesses, the import floor, /proc readings, and another
revision's code (a previous release) checked out to run beside this tree's."""

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
INOTIFY_EVENTS = "create,modify,close_write,attrib,moved_from,moved_to,delete"
REPO = Path(__file__).resolve().parent.parent
FAKELIBFDB_SOURCE_ENV = "CODI2_FAKELIBFDB_SRC"
# The two libraries the design names for the health server and the settings: their import is the floor
# under codi2's start-up and memory, measured with the same interpreter in the same run.
CREATED_JSONL = ("--action", "created", "--format", "jsonl")
IMPORT_FLOOR = "import aiohttp.web, pydantic_settings"


@dataclass(frozen=True)
class Code:
    """Which codi2 a child process runs: the package under `root` (this tree, or a checkout of another
    revision), with the same interpreter and venv, found first through the child's cwd and PYTHONPATH (the
    venv's editable install of this tree is a meta-path finder, consulted after them)."""

    root: Path = REPO
    revision: str = "this tree"

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(self.root), os.environ.get("PYTHONPATH")]))}

    def module_file(self, env: dict[str, str]) -> Path:
        """`codi2.__file__` as a child with `env` and this cwd imports it: exits unless it is under `root`,
        so a figure is never put under the wrong code's name."""
        result = subprocess.run(
            [sys.executable, "-c", "import codi2; print(codi2.__file__)"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=self.root,
        )
        found = Path(result.stdout.strip())
        if not found.is_relative_to(self.root):
            sys.exit(f"bench: {self.revision}: a child imports codi2 from {found}, not from {self.root}")
        return found


def git(*args: str) -> str:
    result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"bench: git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


@contextmanager
def checkout(ref: str, base: Path) -> Iterator[Code]:
    """The tree at `ref` in a detached worktree of this repository under `base`, its modules compiled as
    `make bench` compiles this tree's (so neither pays for compiling at start-up); removed at the end."""
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    root = base / f"codi2-{sha[:12]}"
    git("worktree", "add", "--detach", str(root), sha)
    try:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "codi2")], check=True)
        yield Code(root, f"{ref} ({sha[:12]})")
    finally:
        git("worktree", "remove", "--force", str(root))


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


def import_floor() -> dict[str, float]:
    """`python -c "import aiohttp.web, pydantic_settings"` with this interpreter: its wall time from the
    start to its exit, and its peak RSS as the process itself reads it (`VmHWM`). Not wait4's `ru_maxrss`:
    Linux keeps the peak of the forked copy of this (large) bench process across the exec, so it measured the
    bench, not the imports."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_FLOOR + "; print(open('/proc/self/status').read())"],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"bench: {IMPORT_FLOOR!r} exited {proc.returncode}: {proc.stderr}")
    hwm = next(line for line in proc.stdout.splitlines() if line.startswith("VmHWM:"))
    return {"wall_s": wall, "rss_mb": int(hwm.split()[1]) / 1024}


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


def health_port(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120, interval: float = 0.05) -> int:
    """The health port a daemon logged in its `codi2_ready` line (it binds port 0), read every `interval`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"codi2_ready"' in line:
                port: int = json.loads(line)["health_port"]
                return port
        if proc.poll() is not None:
            sys.exit(f"bench: codi2 exited: {log.read_text()[-2000:]}")
        time.sleep(interval)
    sys.exit(f"bench: codi2 did not start (log {log})")


def scrape(port: int) -> dict[str, float]:
    """Every series of a daemon's /metrics, keyed by its name with its labels as printed
    (`codi2_store_errors_total{error="fdb_1020"}`)."""
    series: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                series[name] = float(value)
    return series


class FakeFdb:
    """The fake libfdb_c (`../shared/fakelibfdb`, an SQLite file behind the C API) built into `base`, for
    the real `fdb` bindings of child processes: they find it through LD_LIBRARY_PATH, as a deployment finds
    the real library, so nothing in the venv changes. Built as tests/fakefdb.py builds it."""

    def __init__(self, base: Path) -> None:
        source = self.source()
        self.lib_dir = base / "fakelibfdb"
        result = subprocess.run(
            ["make", "-C", str(source), f"BUILD={self.lib_dir}", "CFLAGS=-O2 -Wl,-soname,libfdb_c.so"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            sys.exit(f"bench: building the fake libfdb_c failed (gcc, make, libsqlite3-dev?):\n{result.stderr}")

    @staticmethod
    def source() -> Path:
        """$CODI2_FAKELIBFDB_SRC, else ../shared/fakelibfdb beside the repo, else /work/shared/fakelibfdb."""
        for candidate in (os.environ.get(FAKELIBFDB_SOURCE_ENV), REPO.parent / "shared" / "fakelibfdb"):
            if candidate and (Path(candidate) / "fake_fdb_c.c").is_file():
                return Path(candidate)
        fallback = Path("/work/shared/fakelibfdb")
        if (fallback / "fake_fdb_c.c").is_file():
            return fallback
        sys.exit(f"bench: no fake libfdb_c source: set {FAKELIBFDB_SOURCE_ENV} or check out ../shared/fakelibfdb")

    def env(self, data: Path, *, count_reads: bool) -> dict[str, str]:
        """A child's variables: the library, its data file, and whether its reads are counted too."""
        env = {
            "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(self.lib_dir), os.environ.get("LD_LIBRARY_PATH")])),
            "FAKEFDB_DATA": str(data),
        }
        if count_reads:
            env["FAKEFDB_COUNT_READS"] = "1"
        return env

    @staticmethod
    def counters(data: Path) -> dict[str, Any]:
        """What the fake counted over every process on `data` (commits, and reads where counted)."""
        path = Path(f"{data}.counters.json")
        counted: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"commits": 0}
        return counted


class Codi2:
    """`codi2 run` in `base` with a fresh state dir and store every time: on SQLite, or on FoundationDB
    over the fake libfdb_c when `fdb` is given (its data file `fdb.sqlite`, reads counted)."""

    def __init__(self, base: Path, workspace: Path, *, max_delay_ms: int = 200, fdb: FakeFdb | None = None) -> None:
        self.db = base / "audit.db"
        self.data = base / "fdb.sqlite"
        self.state = base / "state"
        self.fdb = fdb
        stale = [self.state]
        for path in (self.db, self.data):
            stale += [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.counters.json")]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.config = base / "codi2.toml"
        if fdb is None:
            store = f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(self.db))}\n'
            env: dict[str, str] = {}
        else:
            cluster = base / "fdb.cluster"
            cluster.write_text("bench:fake@127.0.0.1:4500\n")  # never read by the fake
            store = f'[storage]\nbackend = "fdb"\n[foundationdb]\ncluster_file = {json.dumps(str(cluster))}\n'
            env = fdb.env(self.data, count_reads=True)
        self.config.write_text(
            f'[server]\nbind_addr = "127.0.0.1:0"\n[monitoring]\nwatch_paths = [{json.dumps(str(workspace))}]\n'
            f"{store}[state]\ndir = {json.dumps(str(self.state))}\n[batching]\nmax_delay_ms = {max_delay_ms}\n"
            '[logging]\nlevel = "info"\nformat = "json"\n'
        )
        self.log = base / "codi2.log"
        self.started = time.monotonic()
        with open(self.log, "w") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "codi2",
                    "--config",
                    str(self.config),
                    "--user-id",
                    "bench",
                    "--tenant-id",
                    "bench",
                ],
                stderr=stderr,
                stdout=subprocess.DEVNULL,
                env={**os.environ, **env},
            )
        self.pid = self.proc.pid
        self.port = health_port(self.log, self.proc, interval=0.01)  # read finely: start-up is timed through it

    def ready_seconds(self) -> float:
        """From the process start to /readyz 200."""

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        poll_until(ready, 120, interval=0.005)
        return time.monotonic() - self.started

    def scanned(self) -> bool:
        """The start-up diff is done: what follows is the scenario's own work."""
        return bool(self.status()["initial_scan"] == "done")

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db, timeout=10) as conn:
            return conn.execute(sql).fetchall()

    def count_files(self) -> int:
        """Files recorded as created (a `/` in the path: the burst's files, not its directories)."""
        if self.fdb is not None:
            return self._count_files_fdb(self.fdb)
        return int(self.query("SELECT count(*) FROM events WHERE action = 'created' AND instr(path, '/') > 0")[0][0])

    def _count_files_fdb(self, fdb: FakeFdb) -> int:
        """The trail as `codi2 events` prints it from the store, in a process of its own (reads not counted)."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "codi2",
                "events",
                "--config",
                str(self.config),
                "--tenant-id",
                "bench",
                *CREATED_JSONL,
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **fdb.env(self.data, count_reads=False)},
        )
        return sum(1 for line in result.stdout.splitlines() if "/" in json.loads(line)["path"])

    def shipped(self) -> bool:
        """Nothing waits in the journal's outbox: every event so far is in the store."""
        return self.metric("codi2_spool_events") == 0

    def metric(self, name: str) -> float:
        """One unlabelled series of /metrics (a counter's `_total`, a gauge)."""
        return scrape(self.port)[name]

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=5) as resp:
            status: dict[str, Any] = json.loads(resp.read())
            return status

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

    def call(self, command: list[Any]) -> dict[str, Any]:
        out = subprocess.run([*self._args, "-j"], input=json.dumps(command), capture_output=True, check=True, text=True)
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

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
