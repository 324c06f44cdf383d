"""Packaging: the single-file executable runs with the system python (and provisions from anywhere),
Dockerfile.workspace passes hadolint and builds both images as targets, the Cloud Build recipe builds them
with the release's tag."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from codi2 import __version__
from codi2.provisioning.render import CODI2_UID, USER_UID

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RENDER_FLAGS = ("--registry", "registry.example/c", "--fdb-cluster-string", "a:b@10.0.0.1:4500")


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
    render = subprocess.run(  # outside the repo: no config/codi2.toml to fall back on
        [str(exe), "provision", "render", "--user-id", "a", "--tenant-id", "t", *RENDER_FLAGS],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert render.returncode == 0 and f"image: registry.example/c/codi2:{__version__}" in render.stdout, render.stderr
    assert list((REPO / "dist").glob("codi2-*.whl"))


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(REPO / "Dockerfile.workspace")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stages() -> dict[str, str]:
    """Each stage of Dockerfile.workspace by name, with its text."""
    text = (REPO / "Dockerfile.workspace").read_text()
    parts = re.split(r"^FROM (\S+) AS (\S+)\n", text, flags=re.MULTILINE)[1:]
    return {name: f"FROM {base}\n{body}" for base, name, body in zip(parts[::3], parts[1::3], parts[2::3], strict=True)}


def test_dockerfile_workspace_builds_the_sidecar_by_default_and_the_entrypoint_image_as_a_target() -> None:
    """The design names Dockerfile.workspace; the sidecar is its last stage (what a build without
    --target makes), run as codi2's own non-root user with a health check."""
    stages = _stages()
    assert list(stages)[-1] == "codi2" and {"runtime", "workspace"} <= set(stages)
    runtime, sidecar, workspace = stages["runtime"], stages["codi2"], stages["workspace"]
    assert 'ENTRYPOINT ["/usr/local/bin/codi2"]' in runtime and "HEALTHCHECK" in runtime and "8765/livez" in runtime
    assert "ARG FDB_VERSION=" in runtime and "foundationdb-clients_${FDB_VERSION}" in runtime
    assert sidecar.startswith("FROM runtime") and f"USER {CODI2_UID}:{CODI2_UID}" in sidecar
    assert workspace.startswith("FROM runtime") and f"USER {USER_UID}:{USER_UID}" in workspace
    assert not (REPO / "Dockerfile.codi2").exists()


def test_cloudbuild_builds_both_targets_tagged_with_the_release_never_latest() -> None:
    build = yaml.safe_load((REPO / "packaging" / "cloudbuild.yaml").read_text())
    targets = {step["id"]: step["args"] for step in build["steps"] if "build" in step["args"]}
    assert set(targets) == {"codi2", "workspace"}
    for target, args in targets.items():
        assert "--file=Dockerfile.workspace" in args and f"--target={target}" in args
        assert "--build-arg=FDB_VERSION=${_FDB_VERSION}" in args
    assert "--tag=${_REGISTRY}/codi2:${_VERSION}" in targets["codi2"]
    tags = [arg.removeprefix("--tag=") for args in targets.values() for arg in args if arg.startswith("--tag=")]
    assert "${_REGISTRY}/codi2:${_VERSION}" in build["images"] and sorted(build["images"]) == sorted(tags)
    assert not [image for image in build["images"] if not image.endswith(("${_VERSION}", "${SHORT_SHA}"))]
