"""Retention, archive, prune and offboarding, one policy for both backends (issue #23, item 6): real SQLite
files, the real `fdb` bindings over the fake libfdb_c, the CLI's own entry point, the daemon as a process."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml
from conftest import DaemonProcess, run_codi2, wait_for, write_config
from sink_contract import chain_of, make_event
from tamper import FdbTamper, SqliteTamper, Tamper

from codi2.cli.main import main
from codi2.config import load_settings
from codi2.daemon.daemon import StateLock
from codi2.daemon.retention import prune_once
from codi2.stores.base import Sink
from codi2.stores.fdb.sink import FdbSink
from codi2.stores.sqlite import LocalStore, SqliteSink
from codi2.trail.events import EventQuery
from codi2.trail.verify import verify

T0 = 1_700_000_000  # the fake clock: batch b is journaled and committed at T0 + b hours
BATCHES, PER_BATCH = 50, 100
CUTOFF = datetime.fromtimestamp(T0 + 45 * 3600 - 60, UTC)  # 45 of the 50 batches (90% of the events) before it
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Store:
    sink: Sink
    config: Path
    keys: Callable[[], int]  # what the tenant takes in the store: rows, or keys
    tamper: Tamper


def _fill(sink: Sink, tenant: str = "t1") -> None:
    batches = chain_of(
        *(
            [make_event(f"src/{b}/{i}.py", tenant=tenant, ts=T0 + b * 3600 + i / 1000) for i in range(PER_BATCH)]
            for b in range(BATCHES)
        )
    )
    for batch in batches:
        sink.write_batch(batch)


@pytest.fixture(params=["sqlite", "fdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    if request.param == "sqlite":
        db = tmp_path / "audit.db"
        sink: Sink = SqliteSink(db)
        config = tmp_path / "codi2.toml"
        config.write_text(f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(db))}\n')

        def rows() -> int:
            with closing(sqlite3.connect(db)) as c:
                return sum(
                    c.execute(f"SELECT count(*) FROM {t} WHERE tenant_id = 't1'").fetchone()[0]
                    for t in ("events", "batches", "horizons")
                )

        yield Store(sink, config, rows, SqliteTamper(db))
        sink.close()
        return
    fdb_api: ModuleType = request.getfixturevalue("fdb_api")
    cluster = tmp_path / "fdb.cluster"
    cluster.write_text("test:fake@127.0.0.1:4500\n")  # the fake reads none; codi2 requires that the file exists
    monkeypatch.setenv("FDB_CLUSTER_FILE", str(cluster))
    database = fdb_api.open(str(cluster))
    clock = iter(range(T0, T0 + BATCHES * 3600, 3600))
    fdb_sink = FdbSink(database, tenant_id="t1", clock=lambda: next(clock))
    config = tmp_path / "codi2.toml"
    config.write_text('[storage]\nbackend = "fdb"\n')

    def keys() -> int:
        return len(list(database.get_range_startswith(fdb_sink.key("t1"))))

    yield Store(fdb_sink, config, keys, FdbTamper(database))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def _archive_file(out: Path) -> Path:
    manifest = json.loads((out / "manifest.json").read_text())
    return out / manifest["streams"][0]["files"][0]


def _archive(capsys: pytest.CaptureFixture[str], store: Store, out: Path) -> int:
    """`codi2 archive` of tenant t1 before CUTOFF into `out`; its exit code."""
    args = ["--config", str(store.config), "--tenant-id", "t1", "--before", CUTOFF.isoformat(), "--out", str(out)]
    return _cli(capsys, "archive", *args)[0]


def _forge_manifest(out: Path, data: Path) -> None:
    """The manifest's sha256 of `data` made to match the file as it now is (a forger's second step)."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][data.name]["sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))


def _rewrite(path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    with gzip.open(path, "rb") as f:
        lines = [json.loads(line) for line in f]
    edit(lines)
    with gzip.open(path, "wb") as f:
        f.writelines(json.dumps(line).encode() + b"\n" for line in lines)


def _drop_one_record(lines: list[dict[str, Any]]) -> None:
    records = msgspec.msgpack.decode(base64.b64decode(lines[3]["records"]))
    lines[3]["records"] = base64.b64encode(msgspec.msgpack.encode(records[:-1])).decode()


def test_archive_then_prune_keeps_a_verifiable_trail_and_frees_the_store(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(store.sink)
    before, everything = store.keys(), [e for _, e in store.sink.read(EventQuery("t1"))]
    cfg, out = str(store.config), tmp_path / "archive"
    code, text = _cli(
        capsys, "archive", "--config", cfg, "--tenant-id", "t1", "--before", CUTOFF.isoformat(), "--out", str(out)
    )
    assert code == 0, text
    code, text = _cli(capsys, "prune", "--config", cfg, "--tenant-id", "t1", "--archive", str(out), "--json")
    assert code == 0, text
    pruned = json.loads(text)
    assert pruned["streams"] == {
        "stream-1": {"horizon": 45, "link": pruned["streams"]["stream-1"]["link"], "batches": 45, "events": 4500}
    }
    after = store.keys()
    with capsys.disabled():
        print(f"\nkeys or rows of the tenant: {before} before the prune, {after} after")
    assert after <= 0.15 * before
    assert [e for _, e in store.sink.read(EventQuery("t1"))] == everything[4500:]
    report = verify(store.sink, "t1")
    assert report.ok and report.streams[0].pruned_through == 45 and report.streams[0].batches == 5
    assert _cli(capsys, "verify", "--config", cfg, "--tenant-id", "t1")[0] == 0
    code, text = _cli(capsys, "verify", "--archive", str(out), "--json")
    assert code == 0 and json.loads(text)["batches"] == 45 and json.loads(text)["events"] == 4500
    code, text = _cli(capsys, "prune", "--config", cfg, "--tenant-id", "t1", "--before", CUTOFF.isoformat(), "--json")
    assert code == 0 and json.loads(text)["batches"] == 0  # nothing more before the cutoff
    # one live event deleted: named, however the horizon stands
    live = store.sink.batch_events("t1", next(iter(store.sink.batches("t1", "stream-1"))))
    store.tamper.delete_event("t1", live[10][0])
    assert _cli(capsys, "verify", "--config", cfg, "--tenant-id", "t1")[0] == 1


def test_an_archived_event_deleted_or_altered_is_found(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(store.sink)
    out = tmp_path / "archive"
    assert _archive(capsys, store, out) == 0
    data = _archive_file(out)
    _rewrite(data, _drop_one_record)
    code, text = _cli(capsys, "verify", "--archive", str(out), "--json")
    assert code == 1 and {b["kind"] for b in json.loads(text)["breaks"]} == {"bad_sha256", "missing_batch"}
    _forge_manifest(out, data)  # the file's sha256 forged too: the chain still says
    code, text = _cli(capsys, "verify", "--archive", str(out), "--json")
    assert code == 1 and {b["kind"] for b in json.loads(text)["breaks"]} == {"event_removed"}

    def alter(lines: list[dict[str, Any]]) -> None:
        records = msgspec.msgpack.decode(base64.b64decode(lines[3]["records"]))
        records[0][9] = b"elsewhere.py"  # the path of one event
        lines[3]["records"] = base64.b64encode(msgspec.msgpack.encode(records)).decode()

    fresh = tmp_path / "again"
    assert _archive(capsys, store, fresh) == 0
    data = _archive_file(fresh)
    _rewrite(data, alter)
    _forge_manifest(fresh, data)
    code, text = _cli(capsys, "verify", "--archive", str(fresh), "--json")
    assert code == 1 and {b["kind"] for b in json.loads(text)["breaks"]} == {"altered"}


def test_a_prune_cannot_hide_the_first_live_batch_gone(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(store.sink)
    store.sink.prune(store.sink.retention_plan("t1", CUTOFF))
    assert verify(store.sink, "t1").ok
    store.tamper.delete_header("t1", "stream-1", 46)  # the batch right after the horizon
    kinds = {b.kind for s in verify(store.sink, "t1").streams for b in s.breaks}
    assert "starts_mid_chain" in kinds


def test_a_prune_refuses_an_archive_the_store_no_longer_matches(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(store.sink)
    out = tmp_path / "archive"
    assert _archive(capsys, store, out) == 0
    store.sink.prune(store.sink.retention_plan("t1", datetime.fromtimestamp(T0 + 10 * 3600 - 60, UTC)))
    code, text = _cli(capsys, "prune", "--config", str(store.config), "--tenant-id", "t1", "--archive", str(out))
    assert code == 1 and "archive again" in text


def test_delete_tenant_needs_yes_and_removes_only_that_tenant(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(store.sink)
    other = chain_of([make_event("kept", tenant="t2")], stream="stream-2")
    if isinstance(store.sink, FdbSink):
        store.sink = FdbSink(store.sink._db, tenant_id=None)  # the test's writer is scoped to t1
    store.sink.write_batch(other[0])
    code = main(["delete-tenant", "--config", str(store.config), "--tenant-id", "t1"])
    assert code == 2 and store.keys() > 0
    assert main(["delete-tenant", "--config", str(store.config), "--tenant-id", "t1", "--yes"]) == 0
    assert store.keys() == 0 and [e.path for _, e in store.sink.read(EventQuery("t2"))] == ["kept"]


def test_sqlite_prune_is_refused_while_a_daemon_holds_the_store(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    sink = SqliteSink(db)
    _fill(sink)
    sink.close()
    config = tmp_path / "codi2.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(db))}\n')
    lock = StateLock(tmp_path, file=db)  # what a running daemon holds
    lock.acquire()
    try:
        result = run_codi2("prune", "--config", str(config), "--tenant-id", "t1", "--before", CUTOFF.isoformat())
    finally:
        lock.release()
    assert result.returncode == 1 and "another codi2" in result.stdout and "max_age" in result.stdout
    assert len(result.stdout.splitlines()) == 1
    assert verify(SqliteSink(db), "t1").streams[0].batches == BATCHES  # nothing pruned


def test_the_sqlite_daemon_applies_max_age_on_its_journal_thread(tmp_path: Path) -> None:
    workspace, db = tmp_path / "ws", tmp_path / "audit.db"
    workspace.mkdir()
    sink = SqliteSink(db)
    _fill(sink)  # stream-1, journaled in 2023: far older than a day
    sink.close()
    config = write_config(tmp_path / "codi2.toml", workspace, db, '[retention]\nmax_age = "1d"\n')
    daemon = DaemonProcess(config, db)
    try:
        wait_for(lambda: daemon.logged("retention_pruned"))
        (workspace / "new.txt").write_text("hi")
        wait_for(lambda: any(e.path == "new.txt" for e in daemon.events()))
    finally:
        assert daemon.terminate() == 0
    reader = SqliteSink(db, create=False)
    assert reader.horizons("t1")["stream-1"].number == BATCHES
    assert not any(e.path.startswith("src/") for _, e in reader.read(EventQuery("t1")))
    assert verify(reader, "t1").ok


def test_max_age_is_a_duration() -> None:
    result = run_codi2("config", "check", env={"CODI2_RETENTION__MAX_AGE": "90 days"})
    assert result.returncode == 2 and "retention.max_age" in result.stderr and "90d" in result.stderr
    assert run_codi2("config", "check", env={"CODI2_RETENTION__MAX_AGE": "90d"}).returncode == 0


def test_the_retention_cronjob_validates(tmp_path: Path) -> None:
    path = REPO / "packaging" / "k8s" / "retention" / "cronjob-codi2-retention.yaml"
    manifests = [m for m in yaml.safe_load_all(path.read_text()) if m]
    assert {m["kind"] for m in manifests} == {"ConfigMap", "CronJob"}
    for manifest in manifests:
        kubernetes_validate.validate(manifest, kubernetes_validate.utils.latest_version(), strict=True)
    config = tmp_path / "codi2.toml"
    config.write_text(next(m for m in manifests if m["kind"] == "ConfigMap")["data"]["codi2.toml"])
    assert load_settings(config).retention.max_age == "90d"
    pod = next(m for m in manifests if m["kind"] == "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["command"][-1]
    assert script.index("codi2 archive") < script.index("codi2 prune") and "--archive" in script


def test_a_salvaged_store_keeps_its_horizons(tmp_path: Path) -> None:
    """A damaged SQLite store is salvaged into a new file: without its horizons the first live batch of a
    pruned stream would look cut off."""
    old = tmp_path / "old.db"
    sink = SqliteSink(old)
    _fill(sink)
    sink.prune(sink.retention_plan("t1", CUTOFF))
    sink.close()
    new = tmp_path / "new.db"
    SqliteSink(new).close()
    with closing(sqlite3.connect(new, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        LocalStore.salvage(old, db)
        db.execute("COMMIT")
    salvaged = SqliteSink(new, create=False)
    assert salvaged.horizons("t1")["stream-1"].number == 45 and verify(salvaged, "t1").ok


def test_a_max_age_past_what_a_date_can_reach_back_is_refused() -> None:
    """A max_age of 99999999999d passed config check, then its cutoff (before year 1) stopped the SQLite
    daemon's journal thread at start (nothing recorded) and made `codi2 archive` and `prune` fail with an
    OverflowError."""
    result = run_codi2("config", "check", env={"CODI2_RETENTION__MAX_AGE": "99999999999d"})
    assert result.returncode == 2 and "retention.max_age" in result.stderr and "100 years" in result.stderr
    assert run_codi2("config", "check", env={"CODI2_RETENTION__MAX_AGE": "5200w"}).returncode == 0


def test_a_retention_task_never_stops_the_journal_thread(tmp_path: Path) -> None:
    """A task posted to the journal thread handles its own errors: a cutoff no date can hold raised out of
    prune_once and stopped the thread (journal_thread_failed), so nothing more was recorded."""
    prune_once(tmp_path / "audit.db", "t1", 10**12)
