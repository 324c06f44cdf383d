"""The benchmarks import and parse their arguments: `make bench` is not part of `make test`, so a module they
use that moves (as `codi2.trail.replay.disk_state` did) would otherwise only show on a quiet machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["run.py", "fleet.py"])
def test_bench_script_starts(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
