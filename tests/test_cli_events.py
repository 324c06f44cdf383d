"""`codi2 events` as people and scripts use it, in real processes over a real SQLite trail: piped into
`head`, as a table on a terminal (a real pty), with the filters, with names that are not UTF-8 (#24)."""

from __future__ import annotations

import json
import os
import pty
import shlex
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import WAIT_S, run_codi2
from sink_contract import batch_of, make_event

from codi2.stores.sqlite import SqliteSink
from codi2.trail.events import Event

CODI2 = f"{shlex.quote(sys.executable)} -m codi2"
NOW = datetime.now(UTC).timestamp()


def _trail(tmp_path: Path, events: list[Event]) -> Path:
    """A config whose SQLite store holds `events`, in batches of 100."""
    db = tmp_path / "audit.db"
    sink = SqliteSink(db)
    try:
        for start in range(0, len(events), 100):
            sink.write_batch(batch_of(*events[start : start + 100]))
    finally:
        sink.close()
    config = tmp_path / "codi2.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(db))}\n')
    return config


@pytest.fixture
def big_trail(tmp_path: Path) -> Path:
    """Far more than a pipe holds (64 KiB), so the reader is gone while codi2 still writes."""
    return _trail(tmp_path, [make_event(f"dir/file-{i:05d}.txt", ts=NOW - 3600 + i) for i in range(3000)])


@pytest.mark.parametrize(
    "flags", ["", "--format jsonl", "--format table", "--replay", "--replay --format table", "--limit 2000"]
)
def test_a_reader_that_stops_early_ends_codi2_quietly(big_trail: Path, flags: str) -> None:
    script = f"set -o pipefail; {CODI2} events --config {shlex.quote(str(big_trail))} --tenant-id t1 {flags} | head -1"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=WAIT_S, check=False)
    assert result.stderr == ""  # before: "codi2: BrokenPipeError: [Errno 32] Broken pipe", exit 1
    assert result.returncode in (0, 141), result
    assert len(result.stdout.splitlines()) == 1


def _on_a_terminal(*args: str) -> tuple[int, str, str]:
    """`codi2 ARGS` with stdout on a real pty (what `isatty` sees), stderr captured apart."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "codi2", *args], stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer of the pty is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    return proc.wait(WAIT_S), b"".join(chunks).decode().replace("\r\n", "\n"), stderr


def test_replay_as_a_table_is_a_table_and_as_jsonl_is_compact(tmp_path: Path) -> None:
    config = _trail(tmp_path, [make_event("a.txt", sha256="1" * 64), make_event("b.txt", sha256="2" * 64)])
    table = run_codi2("events", "--config", str(config), "--tenant-id", "t1", "--replay", "--format", "table")
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["TYPE", "SHA256", "ROOT", "PATH"]
    assert [r.split() for r in rows] == [
        ["file", "1" * 64, "/workspace", "a.txt"],
        ["file", "2" * 64, "/workspace", "b.txt"],
    ]
    jsonl = run_codi2("events", "--config", str(config), "--tenant-id", "t1", "--replay")
    first = jsonl.stdout.splitlines()[0]
    assert first == json.dumps(json.loads(first), separators=(",", ":"))  # compact, as the events are


def test_the_table_shows_origin_user_session_mode_and_escapes_names_that_are_not_utf8(tmp_path: Path) -> None:
    odd = os.fsdecode(b"caf\xe9\nlatin1.txt")
    config = _trail(
        tmp_path,
        [
            make_event("plain.txt", user_id="alice", session_id="s-1", mode=0o640, origin="baseline"),
            make_event(odd, user_id="bob", origin="live"),
        ],
    )
    code, out, err = _on_a_terminal("events", "--config", str(config), "--tenant-id", "t1")
    assert code == 0 and err == ""
    header, first, second = out.splitlines()
    assert header.split() == ["TS", "ACTION", "TYPE", "SIZE", "MODE", "ORIGIN", "USER", "SESSION", "OWNER", "PATH"]
    assert first.split()[1:] == ["created", "file", "3", "0640", "baseline", "alice", "s-1", "-", "plain.txt"]
    assert second.split()[5:] == ["live", "bob", "-", "-", "caf\\xe9\\nlatin1.txt"]


def test_an_empty_result_is_said_on_a_terminal_and_silent_in_a_pipe(tmp_path: Path) -> None:
    config = _trail(tmp_path, [make_event("a.txt")])
    code, out, err = _on_a_terminal("events", "--config", str(config), "--tenant-id", "t1", "--action", "deleted")
    assert (code, out) == (0, "") and err.startswith("codi2: no events match (tenant t1")
    piped = run_codi2("events", "--config", str(config), "--tenant-id", "t1", "--action", "deleted")
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, "", "")


def test_filters_by_origin_user_relative_time_and_seq(tmp_path: Path) -> None:
    events = [
        make_event("old.txt", ts=NOW - 3 * 86400, user_id="alice", origin="baseline"),
        make_event("hour.txt", ts=NOW - 1800, user_id="bob", origin="live"),
        make_event("now.txt", ts=NOW - 60, user_id="alice", origin="rescan"),
    ]
    config = _trail(tmp_path, events)

    def paths(*flags: str) -> list[str]:
        result = run_codi2("events", "--config", str(config), "--tenant-id", "t1", *flags)
        assert result.returncode == 0, result.stderr
        return [json.loads(line)["path"] for line in result.stdout.splitlines()]

    assert paths("--origin", "baseline") == ["old.txt"]
    assert paths("--user", "alice") == ["old.txt", "now.txt"]
    assert paths("--user", "alice", "--limit", "1") == ["old.txt"]
    assert paths("--since", "1h") == ["hour.txt", "now.txt"]
    assert paths("--since", "10m") == ["now.txt"]
    assert paths("--since", "2d") == ["hour.txt", "now.txt"]
    assert paths("--since", (datetime.now(UTC) - timedelta(days=4)).isoformat()) == ["old.txt", "hour.txt", "now.txt"]
    assert paths("--after-seq", str(events[0].seq)) == ["hour.txt", "now.txt"]
    assert paths("--origin", "rescan", "--replay") == ["now.txt"]
    bad = run_codi2("events", "--config", str(config), "--tenant-id", "t1", "--since", "yesterday")
    assert bad.returncode == 2 and "neither an ISO 8601 time nor a span such as 30m" in bad.stderr
    for span in ("99999999999d", "3000000d"):  # past year 1: an OverflowError, then a ValueError, not one line
        far = run_codi2("events", "--config", str(config), "--tenant-id", "t1", "--since", span)
        assert far.returncode == 2 and far.stderr.startswith("codi2: --since:") and "back" in far.stderr, far.stderr
