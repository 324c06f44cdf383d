"""What each command imports, and the walls between packages, seen in real processes: the daemon's start-up
time and memory are measured, so `codi2 run` must not load provisioning's machinery (Kubernetes client, YAML),
the CLI's tools or the other commands, `codi2 events` must not load the daemon (aiohttp, inotify), and
`--help` loads neither.
Provisioning never imports the data path, and a store knows nothing of the CLI, watching or the daemon."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess
from sink_contract import batch_of, make_event

from codi2.cli.main import COMMANDS, build_parser
from codi2.stores.sqlite import SqliteSink

DATA_PATH = ("codi2.watch", "codi2.pipeline", "codi2.journal", "codi2.ship", "codi2.stores", "codi2.daemon")
PROVISIONING = ("lightkube", "yaml", "codi2.provisioning.spec", "codi2.provisioning.render", "codi2.provisioning.apply")
CLI_TOOLS = ("shtab", "cryptography", "codi2.cli.checks", "codi2.cli.config_reference", "codi2.cli.tls")
OTHER_COMMANDS = tuple(module for name, module in COMMANDS.items() if name != "run")

MAIN = """
import json, sys
from codi2.cli.main import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "modules": sorted(sys.modules)}, out)
"""


def _under(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def _command(tmp_path: Path, *argv: str) -> tuple[int, set[str]]:
    """Run `codi2 ARGV` through `main` in a fresh interpreter; its exit code and every module it loaded."""
    out = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", MAIN, str(out), *argv],
        capture_output=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "CODI2_CONFIG"},
    )
    result = json.loads(out.read_text())
    return result["code"], set(result["modules"])


def _imports(module: str) -> set[str]:
    program = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(result.stdout))


def test_help_loads_no_command(tmp_path: Path) -> None:
    code, modules = _command(tmp_path, "--help")
    assert code == 0
    assert _under(modules, ("aiohttp", "watchdog", *DATA_PATH, *PROVISIONING, *CLI_TOOLS)) == []


def test_the_running_daemon_never_loaded_provisioning_the_cli_tools_or_other_commands(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    """The whole of `codi2 run`'s import path, start-up to exit, as Python's import log records it."""
    daemon = daemon_factory(env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert daemon.terminate() == 0
    imported = {
        line["text"].rsplit("|", 1)[1].strip()
        for line in daemon.logs
        if line.get("event") == "raw" and line["text"].startswith("import time:") and "|" in line["text"]
    }
    assert {"aiohttp", "codi2.daemon.daemon", "codi2.watch.watcher", "codi2.stores.sqlite"} <= imported
    assert _under(imported, (*PROVISIONING, *CLI_TOOLS)) == []
    assert _under(imported, (*OTHER_COMMANDS, "codi2.provisioning", "codi2.trail.export", "difflib")) == []
    assert _under(imported, ("pathspec",)) == []  # the default ignore patterns are plain names


def test_the_command_table_names_what_each_module_registers() -> None:
    """`main` imports only the module of the command that runs, found by its name in COMMANDS: each name is
    the one its module registers, in the order `--help` lists them."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    for name in COMMANDS:
        one = next(a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
        assert list(one.choices) == [name]


def test_events_loads_the_store_and_not_the_daemon(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    sink = SqliteSink(db)
    sink.write_batch(batch_of(make_event()))
    sink.close()
    config = tmp_path / "codi2.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(db))}\n')
    code, modules = _command(tmp_path, "events", "--config", str(config), "--tenant-id", "t1")
    assert code == 0
    assert "codi2.stores.sqlite" in modules  # the read went through the store
    assert _under(modules, ("aiohttp", "watchdog", "codi2.daemon", "codi2.pipeline", *PROVISIONING, *CLI_TOOLS)) == []


def test_provisioning_never_imports_the_data_path() -> None:
    assert _under(_imports("codi2.provisioning.cli"), (*DATA_PATH, "codi2.trail")) == []


@pytest.mark.parametrize("store", ["codi2.stores.base", "codi2.stores.sqlite", "codi2.stores.fdb.sink"])
def test_a_store_imports_nothing_of_the_cli_watching_or_the_daemon(store: str) -> None:
    walls = ("codi2.cli", "codi2.watch", "codi2.pipeline", "codi2.ship", "codi2.daemon", "codi2.provisioning")
    assert _under(_imports(store), walls) == []
