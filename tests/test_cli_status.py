"""`codi2 status` against a real daemon (ok, degraded, gone), and a mistyped command (#24)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import WAIT_S, DaemonProcess, run_codi2, wait_for
from test_trail import LOCK_HOLDER

from codi2.cli.status import health_url

Start = Callable[..., DaemonProcess]


def test_status_summarises_the_running_daemon_and_says_when_it_is_degraded(
    workspace: Path, daemon_factory: Start
) -> None:
    daemon = daemon_factory()
    url = f"http://127.0.0.1:{daemon.port}"
    ok = run_codi2("status", "--url", url)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].endswith(": ok")
    assert any(line.startswith("roots:") and str(workspace) in line for line in lines)
    for label in ("initial scan:  done", "pending:", "spool:", "store:         sqlite ", "chain head:"):
        assert any(line.startswith(label) for line in lines), (label, lines)
    as_json = run_codi2("status", "--url", url, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["status"] == "ok"
    assert "\n" not in as_json.stdout.strip()

    holder = subprocess.Popen(  # the store locked away: the daemon keeps the change and reports degraded
        [sys.executable, "-c", LOCK_HOLDER, str(daemon.db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        (workspace / "during-the-outage.txt").write_text("x")
        wait_for(lambda: daemon.status()["status"] == "degraded")
        degraded = run_codi2("status", "--url", url)
    finally:
        holder.communicate("\n", timeout=WAIT_S)
    assert degraded.returncode == 1
    assert degraded.stdout.splitlines()[1].startswith("  degraded: store degraded: SQLITE_BUSY")


def test_status_says_in_one_line_when_no_daemon_answers(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "codi2.toml"
    config.write_text(f'[server]\nbind_addr = "0.0.0.0:{port}"\n')
    result = run_codi2("status", "--config", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"codi2: no daemon answering at http://127.0.0.1:{port}/status (")


@pytest.mark.parametrize(
    ("bind", "url"),
    [
        ("0.0.0.0:8765", "http://127.0.0.1:8765"),
        ("[::]:9000", "http://[::1]:9000"),
        ("10.0.0.5:8765", "http://10.0.0.5:8765"),
        ("[fd00::1]:80", "http://[fd00::1]:80"),
    ],
)
def test_the_health_url_is_reached_on_the_loopback_when_the_daemon_listens_everywhere(bind: str, url: str) -> None:
    assert health_url(bind) == url


@pytest.mark.parametrize(("word", "guess"), [("evnets", "events"), ("stauts", "status"), ("provison", "provision")])
def test_a_mistyped_command_gets_the_closest_one_and_the_list(word: str, guess: str) -> None:
    result = run_codi2(word)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"codi2: error: unknown command {word!r} (did you mean {guess!r}?); commands: run, events, verify, status, "
        "archive, prune, delete-tenant, test, provision, config, completion (codi2 --help)\n"
    )


def test_no_subcommand_still_means_run() -> None:
    result = run_codi2("--config", "/nonexistent/codi2.toml", "--user-id", "u", "--tenant-id", "t")
    assert result.returncode == 2 and "/nonexistent/codi2.toml" in result.stderr
