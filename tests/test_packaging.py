"""Packaging: the single-file executable runs with the system python, codi2's Dockerfile passes hadolint,
the Cloud Build recipe builds that Dockerfile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from codi2 import __version__
from codi2.provisioning.render import CODI2_UID

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_make_dist_builds_a_working_single_file_executable(tmp_path: Path) -> None:
    built = subprocess.run(["make", "-C", str(REPO), "dist"], capture_output=True, text=True, timeout=900, check=False)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    exe = REPO / "dist" / "codi2"
    assert exe.read_bytes().startswith(b"#!/usr/bin/env python3")
    env = {**os.environ, "SHIV_ROOT": str(tmp_path / "shiv")}
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"
    for runner in ([str(exe)], [python, str(exe)]):
        version = subprocess.run([*runner, "--version"], capture_output=True, text=True, env=env, timeout=120)
        assert version.returncode == 0 and version.stdout.strip() == f"codi2 {__version__}", version.stderr
    check = subprocess.run(
        [str(exe), "config", "check", "--config", str(REPO / "config" / "codi2.toml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert check.returncode == 0 and '"backend": "fdb"' in check.stdout, check.stderr
    assert list((REPO / "dist").glob("codi2-*.whl"))


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(REPO / "Dockerfile.codi2")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_codi2_as_its_own_non_root_user_with_a_health_check() -> None:
    text = (REPO / "Dockerfile.codi2").read_text()
    assert 'ENTRYPOINT ["/usr/local/bin/codi2"]' in text
    assert f"USER {CODI2_UID}:{CODI2_UID}" in text and "HEALTHCHECK" in text and "8765/livez" in text
    assert "ARG FDB_VERSION=" in text and "foundationdb-clients_${FDB_VERSION}" in text


def test_cloudbuild_builds_and_pushes_the_codi2_image() -> None:
    build = yaml.safe_load((REPO / "packaging" / "cloudbuild.yaml").read_text())
    args = build["steps"][0]["args"]
    assert build["substitutions"]["_IMAGE"] == "gcr.io/${PROJECT_ID}/codi2"
    assert "--file=Dockerfile.codi2" in args and "--build-arg=FDB_VERSION=${_FDB_VERSION}" in args
    assert build["images"] == ["${_IMAGE}:${SHORT_SHA}", "${_IMAGE}:latest"]
