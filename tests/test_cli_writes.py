"""Commands an operator runs on a laptop against the pod's config write nothing but their own output: run
in process on pyfakefs, where every file a command creates is visible (#24, item 6). Before the fix,
`codi2 test --config config/codi2.toml` wrote /workspace/.codi2/fdb.cluster on the host."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Everything these commands import, imported before pyfakefs takes the file system away.
import codi2.cli.checks
import codi2.cli.config_cmd
import codi2.provisioning.render
import codi2.provisioning.spec
import codi2.stores.fdb.sink
from codi2.cli.main import main
from codi2.stores.base import StoreError
from codi2.stores.fdb import client

PATHLIB = Path.__new__.__globals__  # the real pathlib module's namespace
REAL = dict(PATHLIB)  # kept in a dict: pyfakefs replaces a module's own name for Path, not a dict's
SEED = (Path(__file__).resolve().parent.parent / "config" / "codi2.toml").read_text()
CONFIG = "/home/op/codi2.toml"
REGISTRY = ("--registry", "registry.example/coditect")


def _tree() -> set[str]:
    return {os.path.join(top, name) for top, dirs, files in os.walk("/") for name in [*dirs, *files]}


@contextlib.contextmanager
def _pathlib_path() -> Iterator[None]:
    """pydantic validates a path field with the `Path` class it saw when the settings model was built, and
    pyfakefs replaces the name `Path` inside pathlib too, so that class no longer constructs (pyfakefs
    issue #553; pyfakefs patches again before the test body runs, hence here and not in a fixture).
    pathlib gets its own name back meanwhile: the settings' paths are real `Path`s, and every path codi2
    derives or opens goes through the faked `os`, `open` and `Path` of its modules."""
    faked = PATHLIB["Path"]
    PATHLIB["Path"] = REAL["Path"]
    try:
        yield
    finally:
        PATHLIB["Path"] = faked  # as pyfakefs left it, for pyfakefs to restore


@pytest.fixture
def laptop(fs: Any, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """A fake file system holding the pod's config and nothing of the pod's (no /workspace, no
    /etc/foundationdb); returns what is on it before the command runs."""
    for name in list(os.environ):
        if name.startswith("CODI2_") or name in ("FDB_CLUSTER_FILE", "TENANT_ID", "USER_ID"):
            monkeypatch.delenv(name)
    fs.create_file(CONFIG, contents=SEED)
    return _tree()


def test_codi2_test_writes_the_cluster_file_it_needs_to_a_temp_dir_only(
    laptop: set[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def open_store(settings: Any, *, writer: bool) -> None:
        """Where the check stops: what it would hand the client, and what is on disk then."""
        path = client.resolve_cluster_file(settings)
        seen.update(path=path, text=path.read_text(), tree=_tree())
        raise StoreError("stopped here by the test", code="test")

    monkeypatch.setattr(client, "load_fdb", lambda api: object())
    monkeypatch.setattr(client, "client_library_version", lambda fdb: 730)
    monkeypatch.setattr(codi2.stores.fdb.sink, "open_fdb_sink", open_store)
    with _pathlib_path():
        code = main(["test", "--config", CONFIG])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "PASS  cluster_file" not in out and "FAIL  cluster_file" in out and "stopped here by the test" in out
    assert seen["text"] == "coditect:production@10.128.0.8:4500\n"  # the config's cluster_string
    assert not seen["path"].is_relative_to("/workspace")
    assert {p for p in seen["tree"] - laptop if not Path(p).is_relative_to(seen["path"].parent)} == set()
    assert _tree() == laptop  # and the temp dir is gone


def test_config_check_and_provision_render_write_nothing(laptop: set[str], capsys: pytest.CaptureFixture[str]) -> None:
    with _pathlib_path():
        assert main(["config", "check", "--config", CONFIG]) == 0
        assert main(["provision", "render", "--user-id", "a", "--tenant-id", "t", "--config", CONFIG, *REGISTRY]) == 0
    assert "kind: Pod" in capsys.readouterr().out
    assert _tree() == laptop
