"""The whole daemon (real inotify, real health port) committing through the FoundationDB sink, with
the transaction double standing in for a cluster: faults show in /status and lose nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from conftest import eventually
from fdb_double import FakeDatabase, FakeFDBError

from codi2.config import load_settings
from codi2.daemon import Daemon
from codi2.events import EventQuery
from codi2.pipeline import Identity
from codi2.sinks.fdb import FdbSink


async def test_daemon_commits_through_fdb_and_survives_faults(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    config = tmp_path / "codi2.toml"
    config.write_text(
        f'[server]\nbind_addr = "127.0.0.1:0"\n[foundationdb]\ncluster_string = "test:abc@127.0.0.1:4500"\n'
        f"[monitoring]\nwatch_paths = [{json.dumps(str(workspace))}]\n[batching]\nmax_delay_ms = 20\n"
    )
    settings = load_settings(config, tenant_id="t1", user_id="u1")
    assert settings.backend == "fdb"
    db = FakeDatabase()
    sink = FdbSink(db, FakeFDBError, tenant_id="t1")
    daemon = Daemon(settings, Identity("t1", "u1", None, "pod-1"), open_store=lambda _: sink)
    serving = asyncio.create_task(daemon.serve())
    await eventually(lambda: daemon.status()["ready"])

    def stored() -> list[str]:
        return [e.path for _, e in sink.read(EventQuery("t1")) if e.action == "created"]

    async with aiohttp.ClientSession() as http:

        async def status() -> dict[str, Any]:
            async with http.get(f"http://127.0.0.1:{daemon.health.port}/status") as resp:
                return await resp.json()

        (workspace / "a.txt").write_text("a")
        await eventually(lambda: stored() == ["a.txt"])

        db.inject("commit_before", *([1031] * 6))  # the cluster times out six times in a row
        for i in range(10):
            (workspace / f"b{i}.txt").write_text("b")
        for _ in range(600):
            current = await status()
            if current["store"]["state"] == "degraded":
                break
            await asyncio.sleep(0.01)
        assert current["store"]["error_code"] == "transaction_timed_out"
        assert "(1031)" in current["store"]["error"]
        async with http.get(f"http://127.0.0.1:{daemon.health.port}/readyz") as resp:
            assert resp.status == 200

        db.inject("commit_after", 1021)  # and then commits without saying so
        await eventually(lambda: len(stored()) == 11)
        await eventually(lambda: daemon.status()["store"]["state"] == "ok")
        metrics = await (await http.get(f"http://127.0.0.1:{daemon.health.port}/metrics")).text()
        assert 'codi2_store_errors_total{error="transaction_timed_out"} 6.0' in metrics

    daemon.should_exit.set()
    assert await serving == 0
    assert sorted(stored()) == ["a.txt"] + [f"b{i}.txt" for i in range(10)]
    assert not db.faults["commit_before"] and not db.faults["commit_after"]
