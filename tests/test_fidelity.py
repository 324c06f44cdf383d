"""Trail fidelity, the property that sums up zero loss: folding the trail in order reproduces the
workspace exactly (every non-ignored entry and its sha256), with no duplicate (no event id twice, no event
restating what the trail already says), after any sequence of file operations and faults.

Hypothesis drives a real daemon subprocess on a real tree; after each step the test waits for the trail to
catch up (a drain) and checks it. Steps: writes, truncations, directories made and removed, renames, moves
in and out of the tree; groups of operations while the daemon lags (SIGSTOP around them); a directory
renamed and its name re-created, swaps through a temporary name, RENAME_EXCHANGE (renameat2), hard links
written through one name, a directory removed and re-created while a process holds it as its working
directory, trees deeper than PATH_MAX, a directory parked outside the tree (or under an ignored name),
changed there and brought back; and faults: kill -9 mid-change with changes while down, a clean restart,
an unreadable directory (chmod 000, then 755) when the daemon can run as a non-root user, and a full disk
when a small tmpfs can be mounted (root).

Two machines: on SQLite, where the journal is the store's own file (it sits on the small disk with the
workspace); and on FoundationDB over the fake libfdb_c, where the journal is a file of its own with an
outbox, and its faults are tried too: a journal that is not a database, truncated, or a flipped byte in
a batch waiting for a cluster that is down. The SQLite daemon runs as `nobody` when the tests run as root
(setpriv) so that permissions apply to it; the workspace sits on a 16 MiB tmpfs when one can be mounted.
Knobs (environment):

- `CODI2_FIDELITY_EXAMPLES` (default 10), `CODI2_FIDELITY_STEPS` (default 20): `make fidelity` runs 200;
- `CODI2_FIDELITY_FDB_EXAMPLES` (default a quarter of those): the same machine on FoundationDB (the fake
  libfdb_c), slower since its trail is read back with `codi2 events`;
- `CODI2_FIDELITY_SHRINK=1`: shrink a failure to a minimal example (slow: every example runs a daemon);
- `CODI2_FIDELITY_SKIP=rule,rule`: leave rules out, to look past a known failure.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, wait_for, write_config
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from trail_checks import (
    NOBODY,
    FdbDaemon,
    describe,
    diff,
    directory_modes,
    disk_state,
    exchange,
    fill,
    lagging,
    make_deep,
    mount_tmpfs,
    nonroot,
    shared_tmp,
    trail_defects,
    umount,
    write_fdb_config,
)

from codi2.trail.replay import fold

DIRS = ["a", "b", "a/c", "node_modules"]
PATHS = [*DIRS, *(f"{d}/f{i}" for d in ["", *DIRS] for i in range(3))]
paths = st.sampled_from([p.lstrip("/") for p in PATHS])
contents = st.binary(max_size=64)
EXAMPLES = int(os.environ.get("CODI2_FIDELITY_EXAMPLES", "10"))
STEPS = int(os.environ.get("CODI2_FIDELITY_STEPS", "20"))
SKIP = {name.strip() for name in os.environ.get("CODI2_FIDELITY_SKIP", "").split(",") if name.strip()}
DRAIN_S = 30.0  # upper bound of a drain (a condition, polled)
DRAIN_AFTER_FULL_DISK_S = 90.0  # a journal retrying after a full disk backs off for up to 30 s


@functools.cache
def nonroot_wrapper() -> tuple[tuple[str, ...] | None, str]:
    """How to run the daemon unprivileged here (None, and why, when there is no way)."""
    return nonroot()


@functools.cache
def tmpfs_reason() -> str | None:
    """Why a small tmpfs cannot be mounted here; None when it can."""
    probe = Path(tempfile.mkdtemp(prefix="codi2-tmpfs-probe-"))
    reason = mount_tmpfs(probe, "1m")
    if reason is None:
        umount(probe)
    shutil.rmtree(probe, ignore_errors=True)
    return reason


def enabled(name: str, needs: Callable[[], bool] = lambda: True, backend: str | None = None) -> Callable[[Any], Any]:
    """A rule runs unless CODI2_FIDELITY_SKIP names it, this machine lacks what it needs, or it is about
    another backend's journal."""
    return precondition(lambda machine: name not in SKIP and needs() and backend in (None, machine.BACKEND))


# Operations a lagging group is made of: (name, arguments)
ops = st.one_of(
    st.tuples(st.just("write"), paths, contents),
    st.tuples(st.just("truncate"), paths),
    st.tuples(st.just("mkdir"), paths),
    st.tuples(st.just("delete"), paths),
    st.tuples(st.just("rename"), paths, paths),
    st.tuples(st.just("rename_then_recreate"), paths, paths),
    st.tuples(st.just("swap"), paths, paths),
    st.tuples(st.just("exchange"), paths, paths),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("replace_held_dir"), paths),
    st.tuples(st.just("deep"), paths, contents),
    st.tuples(st.just("round_trip"), paths, contents, st.sampled_from(["outside", "ignored"])),
)


FDB_LIB: list[Path] = []  # the fake libfdb_c's directory, set by the test that runs the FoundationDB machine


class TrailFidelity(RuleBasedStateMachine):
    """On the SQLite backend: the journal (index and trail) is the store's own file."""

    BACKEND = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.wrapper = nonroot_wrapper()[0]
        self.nonroot = self.wrapper is not None and "nonroot" not in SKIP and self.BACKEND == "sqlite"
        self.tmp = shared_tmp("codi2-fidelity-") if self.nonroot else Path(tempfile.mkdtemp(prefix="codi2-fidelity-"))
        self.disk: Path | None = None
        if tmpfs_reason() is None:
            self.disk = self.tmp / "disk"
            self.disk.mkdir()
            if mount_tmpfs(self.disk, "16m", NOBODY if self.nonroot and os.geteuid() == 0 else None) is not None:
                self.disk = None
        self.ws = (self.disk or self.tmp) / "workspace"
        self.outside = (self.disk or self.tmp) / "outside"  # on the same file system: renames in and out
        self.ws.mkdir()
        self.outside.mkdir()
        if self.nonroot and os.geteuid() == 0:
            os.chown(self.ws, NOBODY, NOBODY)
        for d in DIRS:  # a workspace to start from (the baseline), so that most steps act on something
            (self.ws / d).mkdir()
        for d in ["", *DIRS]:
            for i in range(2):
                (self.ws / d / f"f{i}").write_bytes(f"seed {d} {i}".encode())
        if self.BACKEND == "fdb":
            self.db = self.tmp / "fdb.sqlite"  # the fake cluster's data
            self.config = write_fdb_config(self.tmp / "codi2.toml", self.ws, self.tmp / "fdb.cluster")
        else:
            self.db = (self.disk or self.tmp) / "audit.db"  # the journal too: on the small disk
            self.config = write_config(self.tmp / "codi2.toml", self.ws, self.db)
        # A write through a name in an ignored tree reaches the trail by the hard-link re-check, once a
        # rescan interval (README): well within a drain here.
        text = self.config.read_text()
        self.config.write_text(text.replace("[monitoring]\n", "[monitoring]\nrescan_interval_s = 5\n", 1))
        self.names = itertools.count()
        self.holders: list[subprocess.Popen[bytes]] = []
        self.drain_s = DRAIN_S
        self.daemon = self._start()

    def _start(self, *, settle: bool = True) -> DaemonProcess:
        if self.BACKEND == "fdb":
            return FdbDaemon(self.config, self.db, FDB_LIB[0], settle=settle)
        return DaemonProcess(
            self.config, self.db, wrapper=self.wrapper if self.nonroot and self.wrapper else (), settle=settle
        )

    def teardown(self) -> None:
        self.daemon.kill()
        self._release()
        with contextlib.suppress(OSError):
            for rel in _unreadable_dirs(self.ws):
                os.chmod(self.ws / rel, 0o755)
        if self.disk is not None:
            umount(self.disk)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _p(self, rel: str) -> Path:
        return self.ws / rel

    def _kill(self) -> None:
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait()

    # Operations (plain methods, so that a lagging group can run them too) ------------------------------

    def _write(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        if path.parent.is_dir() and not path.is_dir():
            path.write_bytes(data)  # in place: every hard link of the file sees it

    def _truncate(self, rel: str) -> None:
        path = self._p(rel)
        if path.is_file():
            os.truncate(path, 0)

    def _mkdir(self, rel: str) -> None:
        path = self._p(rel)
        if path.parent.is_dir() and not path.exists():
            path.mkdir()

    def _delete(self, rel: str) -> None:
        path = self._p(rel)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def _renamable(self, s: Path, d: Path) -> bool:
        if not s.exists() or not d.parent.is_dir() or d == s or d.is_relative_to(s) or s.is_relative_to(d):
            return False
        return not (d.exists() and (d.is_dir() or s.is_dir()))

    def _rename(self, src: str, dst: str) -> None:
        s, d = self._p(src), self._p(dst)
        if self._renamable(s, d):
            s.rename(d)

    def _rename_then_recreate(self, src: str, dst: str) -> None:
        """mv d e; mkdir d; echo > d/f0: the old name is re-used at once."""
        s, d = self._p(src), self._p(dst)
        if s.is_dir() and not d.exists() and self._renamable(s, d):
            s.rename(d)
            s.mkdir()
            (s / "f0").write_bytes(b"recreated")
            event("renamed and re-created")

    def _swap(self, a: str, b: str) -> None:
        """Two entries trade places through a temporary name."""
        x, y = self._p(a), self._p(b)
        if not (x.exists() and y.exists()) or x == y or x.is_relative_to(y) or y.is_relative_to(x):
            return
        tmp = self.ws / f"swap{next(self.names)}"
        x.rename(tmp)
        y.rename(x)
        tmp.rename(y)
        event("swapped through a temporary name")

    def _exchange(self, a: str, b: str) -> None:
        x, y = self._p(a), self._p(b)
        if not (x.exists() and y.exists()) or x == y or x.is_relative_to(y) or y.is_relative_to(x):
            return
        exchange(x, y)
        event("RENAME_EXCHANGE")

    def _link(self, src: str, dst: str) -> None:
        """A second name in the trail (a name in an ignored tree has no watch: a write through it is seen
        by no one until a rescan, an inotify limit this test does not exercise)."""
        if "node_modules" in (src.split("/")[0], dst.split("/")[0]):
            return
        s, d = self._p(src), self._p(dst)
        if s.is_file() and not s.is_symlink() and d.parent.is_dir() and not d.exists() and not d.is_symlink():
            os.link(s, d)
            event("hard link made")

    def _replace_held_dir(self, rel: str) -> None:
        """rm -rf d && mkdir d while a process still has the old d as its working directory."""
        path = self._p(rel)
        if not path.is_dir():
            return
        self.holders.append(subprocess.Popen(["sleep", "3600"], cwd=path))
        shutil.rmtree(path)
        path.mkdir()
        (path / "f1").write_bytes(b"in the new directory")
        event("directory replaced while held as cwd")

    def _deep(self, rel: str, data: bytes) -> None:
        """A chain of directories far past PATH_MAX below `rel`, with a file at the bottom."""
        path = self._p(rel)
        if path.is_dir():
            make_deep(path, 22, file_data=data)
            event("tree past PATH_MAX")

    def _round_trip(self, rel: str, data: bytes, via: str) -> None:
        """mv d <outside the tree, or an ignored name>; change what is in it; mv it back to d."""
        path = self._p(rel)
        if not path.is_dir():
            return
        if via == "outside":
            parked = self.outside / f"parked{next(self.names)}"
        else:
            (self.ws / "dist").mkdir(exist_ok=True)
            parked = self.ws / "dist" / f"parked{next(self.names)}"
        path.rename(parked)
        if not (parked / "f0").is_dir():
            (parked / "f0").write_bytes(data)
        (parked / f"new{next(self.names)}").write_bytes(data)
        parked.rename(path)
        event(f"round trip through {via}")

    def _apply(self, op: tuple) -> None:
        name, *args = op
        if name not in SKIP:  # CODI2_FIDELITY_SKIP leaves an operation out of groups too
            getattr(self, f"_{name}")(*args)

    def _release(self) -> None:
        for holder in self.holders:
            holder.kill()
            holder.wait()
        self.holders = []

    # Rules ----------------------------------------------------------------------------------------------

    @rule(rel=paths, data=contents)
    def write(self, rel: str, data: bytes) -> None:
        self._write(rel, data)

    @rule(rel=paths)
    def truncate(self, rel: str) -> None:
        self._truncate(rel)

    @rule(rel=paths)
    def mkdir(self, rel: str) -> None:
        self._mkdir(rel)

    @rule(rel=paths)
    def delete(self, rel: str) -> None:
        self._delete(rel)

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        self._rename(src, dst)

    @rule(rel=paths)
    def move_out(self, rel: str) -> None:
        path = self._p(rel)
        if path.is_dir():
            path.rename(self.outside / f"gone{next(self.names)}")

    @rule(rel=paths, data=contents)
    def move_in(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        if path.exists() or not path.parent.is_dir():
            return
        incoming = self.outside / f"in{next(self.names)}"
        (incoming / "sub").mkdir(parents=True)
        (incoming / "x").write_bytes(data)
        (incoming / "sub" / "y").write_bytes(data + b"y")
        incoming.rename(path)

    @enabled("round_trip")
    @rule(rel=paths, data=contents, via=st.sampled_from(["outside", "ignored"]))
    def round_trip(self, rel: str, data: bytes, via: str) -> None:
        self._round_trip(rel, data, via)

    @enabled("lagging_group")
    @rule(group=st.lists(ops, min_size=1, max_size=6))
    def lagging_group(self, group: list[tuple]) -> None:
        """The daemon stopped (SIGSTOP) while a group of operations runs; it catches up after SIGCONT."""
        with lagging(self.daemon):
            for op in group:
                self._apply(op)

    @enabled("rename_then_recreate")
    @rule(src=paths, dst=paths)
    def rename_then_recreate(self, src: str, dst: str) -> None:
        self._rename_then_recreate(src, dst)

    @enabled("swap")
    @rule(a=paths, b=paths)
    def swap(self, a: str, b: str) -> None:
        self._swap(a, b)

    @enabled("exchange")
    @rule(a=paths, b=paths)
    def rename_exchange(self, a: str, b: str) -> None:
        self._exchange(a, b)

    @enabled("hard_link")
    @rule(data=contents, pick=st.randoms(use_true_random=False))
    def hard_link_then_write_through_it(self, data: bytes, pick: Any) -> None:
        """A second name for a file, recorded; then a write through the new name changes both names."""
        files, dirs = _tracked(self.ws)
        if not files:
            return
        src = pick.choice(files)
        dst = "/".join(filter(None, [pick.choice(["", *dirs]), f"link{next(self.names)}"]))
        os.link(self._p(src), self._p(dst))
        event("hard link made and written through")
        wait_for(lambda: any(e.path == dst for e in self.daemon.events()), timeout=DRAIN_S)
        self._write(dst, data)

    @enabled("hard_link")
    @rule(data=contents, pick=st.randoms(use_true_random=False))
    def write_through_a_hard_link(self, data: bytes, pick: Any) -> None:
        """Write (in place) through one name of a file that has several."""
        linked = _linked_names(self.ws)
        if linked:
            name = pick.choice(sorted(linked))
            self._write(name, data)
            event("written through one of several hard links")

    @enabled("replace_held_dir")
    @rule(rel=paths)
    def replace_directory_held_as_cwd(self, rel: str) -> None:
        self._replace_held_dir(rel)

    @enabled("replace_held_dir")
    @rule()
    def release_working_directories(self) -> None:
        self._release()

    @enabled("deep")
    @rule(rel=paths, data=contents)
    def deep_tree(self, rel: str, data: bytes) -> None:
        self._deep(rel, data)

    @enabled("kill")
    @rule(before=paths, data=contents, during=paths)
    def kill_mid_change_and_change_while_down(self, before: str, data: bytes, during: str) -> None:
        """kill -9 right after a change (nothing drained), change more while down, start again."""
        self._write(before, data)
        self._kill()
        self._delete(during)
        self._mkdir(during)
        self._write(f"{during}/f0", data + b"!")
        self.daemon = self._start()

    @enabled("restart")
    @rule()
    def stop_and_restart(self) -> None:
        assert self.daemon.terminate() == 0
        self.daemon = self._start()

    @enabled("corrupt_journal", backend="fdb")
    @rule(damage=st.sampled_from(["not-a-database", "truncated"]), rel=paths, data=contents)
    def kill_and_corrupt_the_journal(self, damage: str, rel: str, data: bytes) -> None:
        """kill -9 right after a change, the journal damaged while down: rebuilt, never a crash loop."""
        self._write(rel, data)
        self._kill()
        journal = self.ws / ".codi2" / "journal.db"
        if damage == "not-a-database":
            for suffix in ("-wal", "-shm"):
                Path(str(journal) + suffix).unlink(missing_ok=True)
            journal.write_bytes(b"not a database\n" * 2048)
        else:
            _checkpoint(journal)
            with open(journal, "r+b") as f:
                f.truncate(journal.stat().st_size // 2)
        self._write(rel, data + b" while down")
        event(f"journal {damage}")
        self.daemon = self._start(settle=False)
        assert self.daemon.get("/livez")[0] == 200

    @enabled("flip_byte", backend="fdb")
    @rule(data=contents)
    def flip_a_byte_of_a_batch_waiting_for_the_store(self, data: bytes) -> None:
        """Cluster down, batches wait in the journal, kill -9, one byte of a batch flipped, restart."""
        assert isinstance(self.daemon, FdbDaemon)
        down = self.daemon.down
        down.touch()
        try:
            for i in range(3):
                name = f"queued{next(self.names)}"
                (self.ws / name).write_bytes(data + bytes([i]))
                wait_for(lambda i=i: self.daemon.status()["spool"]["batches"] >= i + 1)
            self._kill()
            journal = self.ws / ".codi2" / "journal.db"
            _checkpoint(journal)
            db = sqlite3.connect(journal)
            bodies = [body for (body,) in db.execute("SELECT body FROM outbox ORDER BY n")]
            db.close()
            raw = bytearray(journal.read_bytes())
            victim = bodies[len(bodies) // 2]
            at = raw.find(victim)
            assert at >= 0
            raw[at + len(victim) // 2] ^= 0xFF
            journal.write_bytes(bytes(raw))
            event("a byte of a waiting batch flipped")
            self.daemon = self._start(settle=False)
            assert self.daemon.get("/livez")[0] == 200
        finally:
            down.unlink()

    @enabled("chmod", lambda: nonroot_wrapper()[0] is not None and "nonroot" not in SKIP, backend="sqlite")
    @rule(
        pick=st.randoms(use_true_random=False),
        inside=st.lists(st.tuples(st.sampled_from(["f0", "f1", "c", "c/f2"]), contents | st.none())),
    )
    def unreadable_directory(self, pick: Any, inside: list[tuple[str, bytes | None]]) -> None:
        """chmod 000 a directory (the daemon is not root), change things in it (we are root: we can),
        chmod 755. While it is unreadable nothing in it may be recorded as deleted that is still there;
        once readable again, the trail catches up (the invariant)."""
        dirs = _tracked(self.ws)[1]
        if not dirs or not self.nonroot:
            return
        rel = pick.choice(dirs)
        path = self._p(rel)
        event("directory made unreadable")
        seen = len(self.daemon.events())
        path.chmod(0o000)
        try:
            for name, data in inside:  # write a file, or (None) delete an entry
                target = path / name
                if data is None:
                    self._delete(str(target.relative_to(self.ws)))
                elif target.parent.is_dir() and not target.is_dir():
                    target.write_bytes(data)
            marker = f"marker{next(self.names)}"
            (self.ws / marker).write_bytes(b"m")
            wait_for(lambda: any(e.path == marker for e in self.daemon.events()), timeout=DRAIN_S)
            wrongly = [
                e
                for e in self.daemon.events()[seen:]
                if e.action == "deleted" and e.path.startswith(rel + "/") and os.path.lexists(self._p(e.path))
            ]
            assert not wrongly, f"deleted while unreadable, yet still there:\n{describe(wrongly)}"
        finally:
            path.chmod(0o755)

    @enabled("disk_full", lambda: tmpfs_reason() is None)
    @rule(group=st.lists(ops, min_size=1, max_size=4))
    def full_disk(self, group: list[tuple]) -> None:
        """The workspace's file system (the state dir too) fills up, things change, space comes back."""
        if self.disk is None:
            return
        (self.ws / "dist").mkdir(exist_ok=True)
        filler = fill(self.ws / "dist")
        try:
            for op in group:
                with contextlib.suppress(OSError):
                    self._apply(op)
            wait_for(
                lambda: (
                    self.daemon.status()["journal"]["state"] == "error"
                    or self.daemon.status()["pipeline"]["pending_changes"] == 0
                ),
                timeout=DRAIN_S,
            )
            assert self.daemon.get("/livez")[0] == 200, self.daemon.get("/livez?verbose")
        finally:
            filler.unlink()
            self.drain_s = DRAIN_AFTER_FULL_DISK_S

    # After every step --------------------------------------------------------------------------------------

    @invariant()
    def trail_folds_to_the_disk_without_duplicates(self) -> None:
        expected = disk_state(self.ws)
        try:
            wait_for(lambda: fold(self.daemon.events()) == expected, timeout=self.drain_s)
        except AssertionError:
            events = self.daemon.events()
            raise AssertionError(
                f"trail does not fold to the disk: {diff(fold(events), expected)}\n{describe(events)}"
            ) from None
        self.drain_s = DRAIN_S
        events = self.daemon.events()
        defects = trail_defects(events)
        assert not defects, "trail defects:\n" + "\n".join(defects[:20]) + f"\n{describe(events)}"


def _tracked(root: Path) -> tuple[list[str], list[str]]:
    """(files, directories) of the trail's part of `root`, sorted (not below ignored or deep trees)."""
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".codi2", "node_modules", "dist") and len(d) < 100)
        dirs += [os.path.relpath(os.path.join(dirpath, d), root) for d in dirnames]
        files += [
            os.path.relpath(os.path.join(dirpath, f), root)
            for f in sorted(filenames)
            if os.path.isfile(os.path.join(dirpath, f)) and not os.path.islink(os.path.join(dirpath, f))
        ]
    return files, dirs


def _linked_names(root: Path) -> list[str]:
    """Files of the trail that have more than one name."""
    return [f for f in _tracked(root)[0] if os.lstat(root / f).st_nlink > 1]


def _unreadable_dirs(root: Path) -> list[str]:
    return [rel for rel, mode in directory_modes(root) if mode & 0o777 == 0]


def _checkpoint(journal: Path) -> None:
    """Everything in the main file (so that a byte of it can be damaged), as after a clean close."""
    try:
        db = sqlite3.connect(journal)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
    except sqlite3.Error as exc:  # already damaged by an earlier step: damage it further
        if "malformed" not in str(exc) and "not a database" not in str(exc):
            raise
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


TrailFidelity.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    + ([Phase.shrink] if os.environ.get("CODI2_FIDELITY_SHRINK") else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
TestTrailFidelity = TrailFidelity.TestCase


class TrailFidelityFdb(TrailFidelity):
    """On FoundationDB (the fake libfdb_c): the journal is a file of its own, with an outbox and a shipper;
    its faults (corrupt, truncated, a flipped byte in a batch waiting for the cluster) are tried here."""

    BACKEND = "fdb"


def test_trail_fidelity_on_foundationdb(fake_libfdb_c: Path) -> None:
    FDB_LIB[:] = [fake_libfdb_c]
    run_state_machine_as_test(
        TrailFidelityFdb,
        settings=settings(
            TrailFidelity.TestCase.settings,
            max_examples=int(os.environ.get("CODI2_FIDELITY_FDB_EXAMPLES", str(max(1, EXAMPLES // 4)))),
        ),
    )


def test_levers_this_machine_lacks_are_named() -> None:
    """The state machine leaves out what this machine cannot do; say so rather than pass silently."""
    missing = [reason for reason in (nonroot_wrapper()[1], tmpfs_reason()) if reason]
    if missing:
        pytest.skip("; ".join(missing))
