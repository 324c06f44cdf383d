"""The benchmarks import and parse their arguments: `make bench` is not part of `make test`, so a module they
use that moves (as `codi2.trail.replay.disk_state` did) would otherwise only show on a quiet machine."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--fleet-v1-ref", "no-such-ref-23"], "no-such-ref-23"), (["--fleet-variants", "v1,v3"], "unknown fleet")],
)
def test_fleet_refuses_a_wrong_variant_or_ref_before_running(args: list[str], says: str) -> None:
    """Checked before the fake is built or any scenario runs (in `make bench` the fleet runs last)."""
    result = subprocess.run(
        [sys.executable, str(BENCH / "fleet.py"), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert says in result.stderr


def test_fleet_v1_runs_the_release_checked_out(tmp_path: Path) -> None:
    """The v1 column is the previous release's code: a child started as the bench starts it imports codi2 from
    the checkout (not from this tree, which the venv installs), and the checkout is gone afterwards."""
    sys.path.insert(0, str(BENCH))
    try:
        import common
        import fleet
    finally:
        sys.path.remove(str(BENCH))
    with common.checkout(fleet.V1_REF, tmp_path) as code:
        found = code.module_file({**os.environ, **code.env()})
        assert found == code.root / "codi2" / "__init__.py"
        assert "Layout v2" not in (code.root / "codi2" / "stores" / "fdb" / "codec.py").read_text()
    assert not code.root.exists()
    assert str(code.root) not in common.git("worktree", "list")
