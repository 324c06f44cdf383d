"""What the churn and fidelity tests check a trail against, and the real-world levers they pull.

- `disk_state` (conftest's): the workspace as a complete trail must fold to, read by the daemon's own walk.
- `trail_defects`: an event that restates what the trail already says (a `created` for a path the trail
  has, an `updated` that changes nothing, a `deleted` or `moved` of a path the trail does not have), an
  event id seen twice, an entry recorded inside a directory the trail does not have.
- `lagging`: SIGSTOP the daemon (every thread really stopped) around a group of operations, as a busy
  machine would; the kernel keeps queueing and the daemon reads it all after SIGCONT.
- `exchange` (renameat2 RENAME_EXCHANGE), `make_deep` (paths past PATH_MAX built with directory fds),
  `nonroot` (a wrapper that runs the daemon as `nobody`), `tmpfs` (a small file system), `store_outage`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fakefdb
from conftest import WAIT_S, DaemonProcess, Ignored, disk_state, run_codi2, wait_for

from codi2.trail.events import LIFECYCLE, Event
from codi2.trail.replay import fold

NOBODY = 65534
RENAME_EXCHANGE = 2
AT_FDCWD = -100


# The disk ---------------------------------------------------------------------------------------------


def directory_modes(root: Path) -> list[tuple[str, int]]:
    """(relative path, mode) of every directory below `root`, read through directory fds (any depth)."""
    out: list[tuple[str, int]] = []
    stack: list[tuple[int, str]] = [(os.open(root, os.O_RDONLY | os.O_DIRECTORY), "")]
    try:
        while stack:
            fd, where = stack.pop()
            try:
                for name in os.listdir(fd):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        rel = f"{where}/{name}" if where else name
                        out.append((rel, st.st_mode))
                        stack.append((os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd), rel))
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return out


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# The trail --------------------------------------------------------------------------------------------


def _facts(e: Event) -> tuple[object, ...]:
    return (e.type, e.size, e.mode, e.mtime, e.sha256, e.uid, e.gid, e.target)


def trail_defects(events: Iterable[Event]) -> list[str]:
    """Everything wrong with a trail as a sequence of observations, folded in order."""
    events = list(events)
    defects = [f"event id {i} appears {n} times" for i, n in Counter(e.id for e in events).items() if n > 1]
    state: dict[tuple[str, str], Event] = {}

    def parent_missing(root: str, path: str) -> bool:
        parent = path.rpartition("/")[0]
        return bool(parent) and (root, parent) not in state

    def say(e: Event, what: str) -> None:
        dest = f" -> {e.dest_path}" if e.dest_path is not None else ""
        defects.append(f"#{e.seq} {e.action} {e.path!r}{dest} ({e.type}, {e.origin}): {what}")

    for e in events:
        if e.action == "gap":
            continue
        key = (e.root, e.path)
        known = state.get(key)
        if e.action == "created":
            if known is not None:
                say(e, f"the trail already has it (#{known.seq} {known.action})")
            elif parent_missing(e.root, e.path):
                say(e, "its directory is not in the trail")
        elif e.action == "updated":
            if known is None:
                say(e, "the trail does not have it")
            elif _facts(known) == _facts(e):
                say(e, f"restates #{known.seq} {known.action} (same type, size, mode, mtime, sha256, owner, target)")
        elif e.action == "deleted":
            if known is None:
                say(e, "the trail does not have it")
        elif e.action == "moved":
            if known is None:
                say(e, "the trail does not have its source")
            elif e.dest_path is None or e.dest_path == e.path:
                say(e, "a move to itself")
            elif parent_missing(e.root, e.dest_path):
                say(e, "its destination's directory is not in the trail")
        _fold_one(state, e)
    return defects


def _fold_one(state: dict[tuple[str, str], Event], e: Event) -> None:
    from codi2.trail.replay import fold_events

    fold_events([e], state)


def describe(events: list[Event], limit: int = 60) -> str:
    shown = events[-limit:]
    return "\n".join(
        f"  #{e.seq} {e.action:8} {e.path!r}{' -> ' + repr(e.dest_path) if e.dest_path else ''} "
        f"{e.type} size={e.size} sha={(e.sha256 or '')[:8]} {e.origin}"
        for e in shown
    )


def diff(got: dict, expected: dict) -> str:
    missing = {k[1]: v for k, v in expected.items() if got.get(k) != v}
    extra = {k[1]: v for k, v in got.items() if k not in expected}
    return f"missing or wrong: {missing}; extra: {extra}"


def converge(
    daemon: DaemonProcess, root: Path, *, ignored: Ignored | None = None, timeout: float = 30.0
) -> list[Event]:
    """Wait until the trail folds to the disk, then check it has no defects; returns the events."""
    expected = disk_state(root, ignored=ignored)
    try:
        wait_for(lambda: fold(daemon.events()) == expected, timeout=timeout)
    except AssertionError:
        events = daemon.events()
        raise AssertionError(
            f"trail does not fold to the disk: {diff(fold(events), expected)}\n"
            f"status: {daemon.status() if daemon.proc.poll() is None else 'exited'}\n"
            f"last events:\n{describe(events)}\nlast logs: {daemon.logs[-15:]}"
        ) from None
    events = daemon.events()
    assert_no_defects(events)
    return events


def assert_no_defects(events: list[Event]) -> None:
    defects = trail_defects(events)
    assert not defects, "trail defects:\n" + "\n".join(defects[:30]) + f"\nevents:\n{describe(events, 80)}"


def final_check(daemon: DaemonProcess, root: Path, *, ignored: Ignored | None = None) -> list[Event]:
    """Converged while running, and still so after a clean stop (which drains everything queued)."""
    converge(daemon, root, ignored=ignored)
    code = daemon.terminate(60)
    events = daemon.events()
    expected = disk_state(root, ignored=ignored)
    assert fold(events) == expected, f"after stop: {diff(fold(events), expected)}\n{describe(events)}"
    assert_no_defects(events)
    assert code == 0, f"exit code {code}; logs {daemon.logs[-10:]}"
    return events


def history(events: Iterable[Event], path: str) -> list[tuple[str, str | None]]:
    return [(e.action, e.dest_path) for e in events if e.path == path or e.dest_path == path]


def ever_named(events: Iterable[Event]) -> set[str]:
    out = set()
    for e in events:
        out.add(e.path)
        if e.dest_path is not None:
            out.add(e.dest_path)
    return out


# Levers -----------------------------------------------------------------------------------------------


def _all_stopped(pid: int) -> bool:
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            if state not in ("T", "t"):
                return False
    except FileNotFoundError:
        return True
    return True


@contextlib.contextmanager
def lagging(daemon: DaemonProcess) -> Iterator[None]:
    """The daemon is stopped (every thread) for the block: it lags behind whatever the block does."""
    pid = daemon.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _all_stopped(pid), interval=0.01)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def exchange(a: Path | bytes, b: Path | bytes) -> None:
    """renameat2(RENAME_EXCHANGE): `a` and `b` trade places atomically (`mv --exchange`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def make_deep(parent: Path, levels: int, width: int = 200, file_data: bytes | None = b"deep") -> list[str]:
    """A chain of `levels` directories of `width`-byte names below `parent` (built with directory fds,
    so the whole path may be far past PATH_MAX), with `deepest.txt` at the bottom. Returns the names."""
    names = [f"{i:03d}" + "d" * (width - 3) for i in range(levels)]
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            fd, up = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(up)
        if file_data is not None:
            write_at(fd, "deepest.txt", file_data)
    finally:
        os.close(fd)
    return names


def write_at(dir_fd: int, name: str, data: bytes) -> None:
    ffd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    with os.fdopen(ffd, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def opened_deep(parent: Path, names: list[str]) -> Iterator[int]:
    """A descriptor of the directory parent/names[0]/.../names[-1]."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            fd, up = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(up)
        yield fd
    finally:
        os.close(fd)


def nonroot() -> tuple[tuple[str, ...] | None, str]:
    """(wrapper that runs a command as a non-root user, reason when there is none)."""
    if os.geteuid() != 0:
        return (), ""
    if shutil.which("setpriv") is None:
        return None, "running as root and setpriv is not installed: no way to run the daemon unprivileged"
    wrapper = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    probe = subprocess.run(
        [*wrapper, sys.executable, "-c", "import os, codi2; print(os.geteuid())"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != str(NOBODY):
        return None, f"setpriv cannot run the daemon as nobody here: {probe.stderr.strip()[-200:]}"
    return wrapper, ""


def shared_tmp(prefix: str) -> Path:
    """A temp dir a non-root daemon can use (owned by nobody when we are root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    return path


def mount_tmpfs(path: Path, size: str, owner: int | None = None) -> str | None:
    """Mount a tmpfs of `size` at `path`; the reason it cannot be done otherwise."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    opts = f"size={size},mode=0755"
    if owner is not None:
        opts += f",uid={owner},gid={owner}"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "codi2-test", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return f"mount -t tmpfs not permitted here: {result.stderr.strip()}"
    return None


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file in `directory` until the file system is full (ENOSPC); returns it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        try:
            while True:
                f.write(b"\0")
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


class StoreOutage:
    """The SQLite store locked by another process (BEGIN EXCLUSIVE): every commit fails SQLITE_BUSY."""

    def __init__(self, db: Path) -> None:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys\n"
                "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "db.execute('PRAGMA journal_mode=WAL')\n"
                "db.execute('CREATE TABLE IF NOT EXISTS codi2_outage (x)')\n"
                "db.execute('BEGIN EXCLUSIVE')\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n"
                "db.execute('ROLLBACK')\n",
                str(db),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        assert line == "locked", f"could not lock the store: {line!r}"

    def end(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(30)


def metric(text: str, name: str) -> float:
    """The sum of every sample of `name` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# The FoundationDB backend (the fake libfdb_c): a journal file of its own, with an outbox and a shipper --------


def write_fdb_config(path: Path, workspace: Path, cluster: Path) -> Path:
    cluster.write_text("test:fake@127.0.0.1:4500\n")  # never read by the fake
    path.write_text(
        f"""
[server]
bind_addr = "127.0.0.1:0"
[foundationdb]
cluster_file = {json.dumps(str(cluster))}
transaction_timeout_ms = 500
[monitoring]
watch_paths = [{json.dumps(str(workspace))}]
ignore_patterns = [".git", "node_modules", "target", "dist"]
[batching]
max_delay_ms = 50
[logging]
level = "debug"
format = "json"
"""
    )
    return path


class FdbDaemon(DaemonProcess):
    """`codi2 run` on FoundationDB over the fake libfdb_c (data in `data`); its trail read with `codi2 events`.
    `outage()` takes the cluster away (the fake's `<data>.down`): every commit and read times out."""

    def __init__(self, config: Path, data: Path, lib_dir: Path, **kwargs: Any) -> None:
        self.lib_dir = lib_dir
        self.down = Path(f"{data}.down")
        super().__init__(config, data, fakefdb.child_env(lib_dir, data), **kwargs)

    def events(self) -> list[Event]:
        result = run_codi2(
            "events",
            "--config",
            str(self.config),
            "--tenant-id",
            "t1",
            env=fakefdb.child_env(self.lib_dir, self.db),
            timeout=120,
        )
        if result.returncode != 0:
            raise AssertionError(f"codi2 events failed: {result.stderr.strip()[-500:]}")
        every = (Event.from_json(line) for line in result.stdout.splitlines())
        return [e for e in every if e.action not in LIFECYCLE]  # the workspace's, as `DaemonProcess.events`


# Tools on the trail and the daemon's files ----------------------------------------------------------------


def run_verify(config: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """`codi2 verify --json` in a process of its own: exit code, report, stderr."""
    result = run_codi2("verify", "--config", str(config), "--tenant-id", "t1", "--json", *args, env=env, timeout=WAIT_S)
    return result.returncode, json.loads(result.stdout) if result.stdout else {}, result.stderr


def overwrite_pages(db_path: Path, pages: Callable[[sqlite3.Connection], list[int]], fill: bytes) -> None:
    """Overwrite the pages `pages` names of a SQLite file, in use by a daemon or not. The WAL is
    checkpointed into the file first and the shared memory cleared, so every connection reads the damage."""
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    numbers = pages(db)
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    assert numbers
    with open(db_path, "r+b") as f:
        for n in numbers:
            f.seek((n - 1) * size)
            f.write(fill * size)
    shm = Path(f"{db_path}-shm")
    if shm.exists():
        shm.write_bytes(b"\0" * shm.stat().st_size)
