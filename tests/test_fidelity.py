"""Trail fidelity, the property that sums up zero loss: folding the trail in order reproduces the
workspace exactly (every non-ignored entry and its sha256), after any sequence of file operations,
directory moves in and out of the tree, and daemon kill -9 / restarts. Hypothesis drives a real daemon
subprocess on a real tree; after each step the test waits for the trail to catch up (a drain)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
from pathlib import Path

from conftest import DaemonProcess, disk_state, wait_for, write_config
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from codi2.replay import fold

DIRS = ["a", "b", "a/c", "node_modules"]
PATHS = [*DIRS, *(f"{d}/f{i}" for d in ["", *DIRS] for i in range(3))]
paths = st.sampled_from([p.lstrip("/") for p in PATHS])
contents = st.binary(max_size=64)


class TrailFidelity(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="codi2-fidelity-"))
        self.ws = self.tmp / "workspace"
        self.outside = self.tmp / "outside"
        self.ws.mkdir()
        self.outside.mkdir()
        self.db = self.tmp / "audit.db"
        self.config = write_config(self.tmp / "codi2.toml", self.ws, self.db)
        self.names = itertools.count()
        self.daemon = self._start()

    def _start(self) -> DaemonProcess:
        return DaemonProcess(self.config, self.db, {"CODI2_MONITORING__INITIAL_SCAN": "events"})

    def teardown(self) -> None:
        self.daemon.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _p(self, rel: str) -> Path:
        return self.ws / rel

    @rule(rel=paths, data=contents)
    def write(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        if path.parent.is_dir() and not path.is_dir():
            path.write_bytes(data)

    @rule(rel=paths)
    def truncate(self, rel: str) -> None:
        path = self._p(rel)
        if path.is_file():
            os.truncate(path, 0)

    @rule(rel=paths)
    def mkdir(self, rel: str) -> None:
        path = self._p(rel)
        if path.parent.is_dir() and not path.exists():
            path.mkdir()

    @rule(rel=paths)
    def delete(self, rel: str) -> None:
        path = self._p(rel)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        s, d = self._p(src), self._p(dst)
        if not s.exists() or not d.parent.is_dir() or d == s or d.is_relative_to(s):
            return
        if d.exists() and (d.is_dir() or s.is_dir()):
            return
        s.rename(d)

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

    @rule(before=paths, data=contents, during=paths)
    def kill_mid_change_and_change_while_down(self, before: str, data: bytes, during: str) -> None:
        """kill -9 right after a change (nothing drained), change more while down, start again."""
        self.write(before, data)
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait()
        self.delete(during)
        self.mkdir(during)
        self.write(f"{during}/f0", data + b"!")
        self.daemon = self._start()

    @rule()
    def stop_and_restart(self) -> None:
        assert self.daemon.terminate() == 0
        self.daemon = self._start()

    @invariant()
    def trail_folds_to_the_disk(self) -> None:
        expected = disk_state(self.ws)
        try:
            wait_for(lambda: fold(self.daemon.events()) == expected, timeout=30)
        except AssertionError:
            got = fold(self.daemon.events())
            missing = {k: v for k, v in expected.items() if got.get(k) != v}
            extra = {k: v for k, v in got.items() if k not in expected}
            raise AssertionError(f"trail does not fold to the disk: missing/wrong {missing}, extra {extra}") from None


TrailFidelity.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestTrailFidelity = TrailFidelity.TestCase
