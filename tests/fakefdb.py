"""The fake libfdb_c of ../shared/fakelibfdb under the real `fdb` bindings, built in the test session.

Child processes (`codi2 run`, `codi2 test`, `codi2 events`) find it through LD_LIBRARY_PATH, as a
deployment finds the real library. This process cannot: the loader reads LD_LIBRARY_PATH only at start,
and the bindings load `libfdb_c.so` by that bare name once, when the API version is selected. So the fake
is built with the soname `libfdb_c.so` and loaded by its path first; the loader then hands the bindings
the library already loaded under that name. Nothing in the venv changes, so a `codi2` started from it
meanwhile still finds only a real libfdb_c.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from codi2.stores.fdb.client import load_fdb

SOURCE_ENV = "CODI2_FAKELIBFDB_SRC"
API_VERSION = 730
REPO = Path(__file__).resolve().parent.parent


def find_source() -> Path | None:
    """$CODI2_FAKELIBFDB_SRC, else ../shared/fakelibfdb beside the repo, else /work/shared/fakelibfdb."""
    for candidate in (os.environ.get(SOURCE_ENV), REPO.parent / "shared" / "fakelibfdb", "/work/shared/fakelibfdb"):
        if candidate and (Path(candidate) / "fake_fdb_c.c").is_file():
            return Path(candidate)
    return None


def build(dest: Path) -> Path:
    """Build `dest/libfdb_c.so` and return `dest`; skip the test, with the reason, where it cannot be built."""
    source = find_source()
    if source is None:
        pytest.skip(f"no fake libfdb_c source: set {SOURCE_ENV} or check out ../shared/fakelibfdb beside the repo")
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("no gcc or make: the fake libfdb_c cannot be built")
    result = subprocess.run(
        ["make", "-C", str(source), f"BUILD={dest}", "CFLAGS=-O2 -Wl,-soname,libfdb_c.so"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        if "sqlite3" in result.stderr:
            pytest.skip(
                "no SQLite headers or library: the fake libfdb_c cannot be built (apt-get install libsqlite3-dev)"
            )
        pytest.fail(f"building the fake libfdb_c failed:\n{result.stderr}")
    return dest


def load_in_process(lib_dir: Path) -> ModuleType:
    """The real `fdb` module of this process, on the fake library (see the module docstring)."""
    if os.environ.get("CODI2_TEST_FDB_CLUSTER_FILE"):
        pytest.skip("CODI2_TEST_FDB_CLUSTER_FILE is set: the bindings in this process run on the installed libfdb_c")
    fake = ctypes.CDLL(str(lib_dir / "libfdb_c.so"))
    fdb = load_fdb(API_VERSION)
    if fdb.impl._capi._handle != fake._handle:
        pytest.fail(f"the bindings in this process loaded another libfdb_c ({fdb.impl._capi._name})")
    return fdb


def child_env(lib_dir: Path, data: Path, faults: str = "", seed: int = 1) -> dict[str, str]:
    """Variables for a child process on the fake: its data file, faults (`KIND:probability,...`) and their seed."""
    return {
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(lib_dir), os.environ.get("LD_LIBRARY_PATH")])),
        "FAKEFDB_DATA": str(data),
        "FAKEFDB_FAULTS": faults,
        "FAKEFDB_SEED": str(seed),
    }


def counters(data: Path) -> dict[str, Any]:
    """What the fake counted over every process on `data`: commits, conflicts, faults by kind."""
    path = Path(f"{data}.counters.json")
    return json.loads(path.read_text()) if path.exists() else {"commits": 0, "faults": {}}
