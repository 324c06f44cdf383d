"""The fleet benchmark (issue #23): N `codi2 run` daemons, one per pod, on one FoundationDB cluster (the fake
libfdb_c: one SQLite file every process shares), to measure what each event costs the cluster with a key
layout: keys and bytes stored, commits, conflicts, reads, client CPU and events/s, in a steady phase (every
pod ~5 files a second) and a burst (1,000 files per pod at once); then a read test on one tenant grown to
~100k events (`codi2 events --since` the last 1% and `--limit 1` against a full read). Each variant (extra
settings and environment: another key layout, say) runs all of it on a fresh cluster and gets a column.

    python bench/fleet.py [--fleet-pods 20] [--fleet-seconds 30] [--fleet-rate 5] [--fleet-burst 1000]
        [--fleet-read-events 100000] [--fleet-variants NAME,...] [--json PATH]

`make bench` runs it as the scenario `fleet` and writes bench/results/fleet.json; run alone it only prints,
unless `--json` names a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fdb.tuple as fdbtuple
from common import REPO, FakeFdb, cpu_seconds, health_port, poll_until, scrape

PANELS = 10  # directories a pod's files are spread over: src/components/panel_NN
PODS_PER_TENANT = 5
K8S_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes draws generated name suffixes from
GROW_ROUND = 5000  # files per pod between waits while a tenant grows: well under the kernel's inotify queue
QUIET_S = 0.3  # no commit for this long: time to ask the daemons whether that was the last
COMMITTED = "codi2_events_committed_total"
STORE_ERRORS = re.compile(r'^codi2_store_errors_total\{error="([^"]*)"\}$')
# One writer process drives every pod: each file is written in the pod's staging directory (outside its
# watch root, same file system) and renamed into the workspace, so the daemon sees one complete file and
# records exactly one `created` event for it. With a rate, pod i's k-th file is due at (k + i/pods) / rate
# seconds, so the pods' writes are spread over each period rather than all at one instant.
WRITER = """
import json, os, sys, time
pods, name, files, rate, panels = json.loads(sys.argv[1])
started = time.monotonic()
for k in range(files):
    for i, (staging, workspace) in enumerate(pods):
        if rate:
            delay = started + (k + i / len(pods)) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        rel = f"src/components/panel_{k % panels:02d}/{name}_{k:06d}.tsx"
        tmp = os.path.join(staging, f"{name}_{k:06d}")
        with open(tmp, "wb") as f:
            f.write(f"// {rel}\\nexport const value{k} = {k};\\n".encode())
        os.rename(tmp, os.path.join(workspace, rel))
"""


@dataclass(frozen=True)
class Variant:
    """What one column measures: TOML keys merged into every daemon's and reader's config (section -> key ->
    value) and environment variables for them. Issue #23's new layout is meant to be a second entry here,
    selected by its config key, so both layouts run side by side in the same run."""

    name: str
    toml: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> tuple[str, ...]:
        return tuple(self.toml.get("foundationdb", {}).get("root_prefix", ("codi2",)))


VARIANTS = (Variant("v1 (today)"),)


@dataclass(frozen=True)
class Identity:
    tenant: str
    user: str
    session: str
    pod: str


def identities(pods: int, seed: int = 23) -> list[Identity]:
    """Ids shaped like the seed's (`tenant-<ms>`, `usr-<hex>`, `ses-<uuid4>`, a Deployment's pod name), the
    same in every run and variant so that their key sizes match: a few tenants, several pods each."""
    rng = random.Random(seed)
    tenants = [f"tenant-{1_733_500_000_000 + rng.randrange(10**8)}" for _ in range(max(1, pods // PODS_PER_TENANT))]

    def name(n: int) -> str:
        return "".join(rng.choice(K8S_ALPHABET) for _ in range(n))

    return [
        Identity(
            tenant=tenants[i % len(tenants)],
            user=f"usr-{rng.getrandbits(64):016x}",
            session=f"ses-{uuid.UUID(int=rng.getrandbits(128), version=4)}",
            pod=f"workspace-{name(10)}-{name(5)}",
        )
        for i in range(pods)
    ]


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """Flat sections of strings, numbers, booleans and lists: their JSON spelling is TOML too."""
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
        for name, keys in sections.items()
    )


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


class Cluster:
    """One fake cluster for one variant: a fresh data file, and the config and environment of every process
    on it."""

    def __init__(self, base: Path, fdb: FakeFdb, variant: Variant) -> None:
        self.dir = base / re.sub(r"[^a-z0-9]+", "-", variant.name.lower()).strip("-")
        self.dir.mkdir(parents=True)
        self.fdb = fdb
        self.variant = variant
        self.data = self.dir / "fdb.sqlite"
        self.cluster_file = self.dir / "fdb.cluster"
        self.cluster_file.write_text("bench:fake@127.0.0.1:4500\n")  # never read by the fake
        self.root = fdbtuple.pack(variant.root)

    def config(self, path: Path, sections: dict[str, dict[str, Any]]) -> Path:
        ours = {"storage": {"backend": "fdb"}, "foundationdb": {"cluster_file": str(self.cluster_file)}, **sections}
        extra = self.variant.toml
        merged = {name: {**ours.get(name, {}), **extra.get(name, {})} for name in {**ours, **extra}}
        path.write_text(toml_text(merged))
        return path

    def env(self) -> dict[str, str]:
        """Every process counts its reads (FAKEFDB_COUNT_READS=1) into the shared counters."""
        return {**os.environ, **self.fdb.env(self.data, count_reads=True), **self.variant.env}

    def counters(self) -> dict[str, Any]:
        return FakeFdb.counters(self.data)

    def usage(self) -> dict[str, list[int]]:
        """What the store holds, from the fake's `kv` table, by namespace (`audit`, `audit_by_path`,
        `event_ids`, `chain`, ...): [keys, key bytes, bytes of their (root, tenant) prefix, value bytes]."""
        totals: dict[str, list[int]] = {}
        with closing(sqlite3.connect(self.data, timeout=60)) as conn:
            for key, value_bytes in conn.execute("SELECT key, length(value) FROM kv"):
                namespace, prefix = "(outside the root prefix)", 0
                if key.startswith(self.root):
                    tenant_end = key.index(b"\x00", len(self.root) + 1)  # a tuple string ends with \x00
                    namespace = key[tenant_end + 2 : key.index(b"\x00", tenant_end + 2)].decode()
                    prefix = tenant_end + 1
                row = totals.setdefault(namespace, [0, 0, 0, 0])
                row[0] += 1
                row[1] += len(key)
                row[2] += prefix
                row[3] += value_bytes
        return totals

    def tenant_events(self, tenant: str) -> int:
        """Audit keys of one tenant: its events (an event too long for one value adds chunk keys elsewhere)."""
        begin = self.root + fdbtuple.pack((tenant, "audit"))
        with closing(sqlite3.connect(self.data, timeout=60)) as conn:
            count: int = conn.execute(
                "SELECT count(*) FROM kv WHERE key > ? AND key < ?", (begin + b"\x00", begin + b"\xff")
            ).fetchone()[0]
        return count


class Pod:
    """`codi2 run` for one pod: its workspace, staging directory (for the writer), state dir and identity."""

    def __init__(self, cluster: Cluster, index: int, who: Identity) -> None:
        self.who = who
        self.dir = cluster.dir / f"pod{index:03d}"
        self.workspace = self.dir / "workspace"
        self.staging = self.dir / "staging"
        for panel in range(PANELS):
            (self.workspace / "src" / "components" / f"panel_{panel:02d}").mkdir(parents=True)
        self.staging.mkdir()
        self.config = cluster.config(
            self.dir / "codi2.toml",
            {
                "server": {"bind_addr": "127.0.0.1:0"},
                "monitoring": {"watch_paths": [str(self.workspace)]},
                "state": {"dir": str(self.dir / "state")},
                "logging": {"level": "info", "format": "json"},
            },
        )
        self.log = self.dir / "codi2.log"
        with open(self.log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "codi2", "run", "--config", str(self.config)),
                    *("--tenant-id", who.tenant, "--user-id", who.user, "--session-id", who.session),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**cluster.env(), "HOSTNAME": who.pod},
                cwd=REPO,
            )
        self.pid = self.proc.pid
        self.port = 0

    def started(self) -> None:
        self.port = health_port(self.log, self.proc, timeout=600)

    def settled(self) -> bool:
        """The start-up diff is done and shipped: what follows is the scenario's own work."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=10) as resp:
            if json.loads(resp.read())["initial_scan"] != "done":
                return False
        return scrape(self.port)["codi2_spool_events"] == 0

    def metrics(self) -> dict[str, float]:
        return scrape(self.port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def store_errors(series: list[dict[str, float]]) -> dict[str, float]:
    """Failed batch commits by error code (e.g. fdb_1020, a conflict), summed over the pods."""
    total: dict[str, float] = {}
    for pod in series:
        for name, value in pod.items():
            if m := STORE_ERRORS.match(name):
                total[m[1]] = total.get(m[1], 0.0) + value
    return total


def write(pods: Sequence[Pod], name: str, files: int, rate: float) -> None:
    """`files` files into every pod, from one writer process (see WRITER)."""
    spec = [[[str(p.staging), str(p.workspace)] for p in pods], name, files, rate, PANELS]
    subprocess.run([sys.executable, "-c", WRITER, json.dumps(spec)], check=True)


def until_committed(cluster: Cluster, pods: Sequence[Pod], targets: list[float], timeout: float) -> float:
    """When the last commit reached the store: the fake's commit counter (a file: the daemons pay nothing for
    it) is watched, and once it has been still for QUIET_S the daemons' committed-events counters say whether
    that was the last."""
    commits, last_change, checked = -1, time.monotonic(), -1
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        value = cluster.counters()["commits"]
        if value != commits:
            commits, last_change = value, now
        elif now - last_change > QUIET_S and checked != commits:
            checked = commits
            if all(p.metrics()[COMMITTED] >= t for p, t in zip(pods, targets, strict=True)):
                return last_change
        if now > deadline:
            have = [p.metrics()[COMMITTED] for p in pods]
            raise TimeoutError(f"bench: fleet: committed {have}, expected {targets}")
        time.sleep(0.05)


def per_event(after: dict[str, list[int]], before: dict[str, list[int]], events: float) -> dict[str, float]:
    """What the store gained, per event: keys (all, and by namespace), key bytes with and without the
    (root, tenant) prefix, value bytes."""
    delta = {ns: [a - b for a, b in zip(row, before.get(ns, [0, 0, 0, 0]), strict=True)] for ns, row in after.items()}
    keys, key_bytes, prefix_bytes, value_bytes = (sum(row[i] for row in delta.values()) for i in range(4))
    figures = {
        "keys_per_event": ratio(keys, events),
        "key_bytes_per_event": ratio(key_bytes, events),
        "key_bytes_per_event_no_prefix": ratio(key_bytes - prefix_bytes, events),
        "value_bytes_per_event": ratio(value_bytes, events),
        "stored_bytes_per_event": ratio(key_bytes + value_bytes, events),
        "stored_bytes_per_event_no_prefix": ratio(key_bytes - prefix_bytes + value_bytes, events),
    }
    for ns, (n, nbytes, _, vbytes) in sorted(delta.items()):
        if n:
            figures[f"keys_per_event.{ns}"] = ratio(n, events)
            figures[f"stored_bytes_per_event.{ns}"] = ratio(nbytes + vbytes, events)
    return figures


def phase(
    cluster: Cluster, pods: Sequence[Pod], name: str, files: int, rate: float, idle_cpu_per_s: float
) -> dict[str, Any]:
    """The writer puts `files` files into every pod (`rate` a second per pod, or 0: at once); the figures
    from its start until every pod has committed them."""
    metrics0 = [p.metrics() for p in pods]
    counters0, usage0 = cluster.counters(), cluster.usage()
    cpu0 = sum(cpu_seconds(p.pid) for p in pods)
    started = time.monotonic()
    write(pods, name, files, rate)
    targets = [m[COMMITTED] + files for m in metrics0]
    last = until_committed(cluster, pods, targets, timeout=300 + files * len(pods) * 0.02)
    cpu = sum(cpu_seconds(p.pid) for p in pods) - cpu0
    idle_cpu = idle_cpu_per_s * (time.monotonic() - started)
    metrics = [p.metrics() for p in pods]
    counters, usage = cluster.counters(), cluster.usage()
    events = sum(m[COMMITTED] - m0[COMMITTED] for m, m0 in zip(metrics, metrics0, strict=True))
    errors0, errors = store_errors(metrics0), store_errors(metrics)

    def counted(name: str) -> float:
        return float(counters.get(name, 0) - counters0.get(name, 0))

    result: dict[str, Any] = {
        "files": files * len(pods),
        "events": events,
        "seconds": last - started,
        "events_per_s": ratio(events, last - started),
        **per_event(usage, usage0, events),
        "commits_per_1k": ratio(1000 * counted("commits"), events),
        "events_per_commit": ratio(events, counted("commits")),
        "commit_attempts": counted("commit_attempts"),
        "conflicts": counted("conflicts"),
        "store_errors": {k: v - errors0.get(k, 0.0) for k, v in errors.items() if v - errors0.get(k, 0.0)},
        "gaps": sum(
            m.get("codi2_gaps_total", 0) - m0.get("codi2_gaps_total", 0)
            for m, m0 in zip(metrics, metrics0, strict=True)
        ),
        "point_reads_per_event": ratio(counted("reads_point"), events),
        "range_reads_per_event": ratio(counted("reads_range"), events),
        "keys_read_per_event": ratio(counted("keys_read"), events),
        "bytes_read_per_event": ratio(counted("bytes_read"), events),
        "cpu_s": cpu,
        "idle_cpu_s": idle_cpu,
        "cpu_s_per_1k": ratio(1000 * (cpu - idle_cpu), events),
    }
    print(f"  {name}: " + ", ".join(f"{k} {_short(v)}" for k, v in result.items()), flush=True)
    return result


def _short(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def grow(cluster: Cluster, pods: Sequence[Pod], tenant: str, target: int) -> dict[str, Any]:
    """The tenant's pods write files until it holds about `target` events, in rounds of GROW_ROUND files per
    pod, each committed before the next, so no inotify queue overflows."""
    mine = [p for p in pods if p.who.tenant == tenant]
    have = cluster.tenant_events(tenant)
    started, rounds = time.monotonic(), 0
    remaining = max(0, math.ceil((target - have) / len(mine)))
    while remaining:
        files = min(GROW_ROUND, remaining)
        before = [p.metrics()[COMMITTED] for p in mine]
        write(mine, f"grow{rounds:02d}", files, 0)
        until_committed(cluster, mine, [b + files for b in before], timeout=300 + files * len(mine) * 0.02)
        remaining -= files
        rounds += 1
    events = cluster.tenant_events(tenant)
    print(f"  tenant {tenant}: {events:,} events ({events - have:,} written in {time.monotonic() - started:.1f} s)")
    return {"tenant": tenant, "pods": len(mine), "events": events, "grow_s": time.monotonic() - started}


def read_once(cluster: Cluster, config: Path, tenant: str, args: list[str], out: Path) -> dict[str, Any]:
    """`codi2 events` in a process of its own, its reads counted: wall and CPU time, events printed."""
    counters0 = cluster.counters()
    err = out.with_suffix(".err")
    started = time.monotonic()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "codi2", "events", "--config", str(config), "--tenant-id", tenant),
                *("--format", "jsonl", *args),
            ],
            stdout=stdout,
            stderr=stderr,
            env=cluster.env(),
            cwd=REPO,
        )
        _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: codi2 events {' '.join(args)} failed: {err.read_text()[-2000:]}")
    counters = cluster.counters()
    with open(out, "rb") as f:
        events = sum(1 for _ in f)
    counted = {n: counters.get(n, 0) - counters0.get(n, 0) for n in ("reads_point", "reads_range", "keys_read")}
    return {"wall_s": wall, "cpu_s": rusage.ru_utime + rusage.ru_stime, "events": events, **counted}


def read_test(cluster: Cluster, config: Path, tenant: str, reps: int) -> dict[str, Any]:
    """A full read of the tenant, `--since` the time of its last 1% of events, `--limit 1`, and `--limit 0`
    (the command's start-up alone: it returns before opening the store); medians of `reps` runs each, the
    keys each read counted by the fake."""
    out = cluster.dir / "events.jsonl"
    read_once(cluster, config, tenant, [], out)  # warms the page cache, and gives the times to pick from
    with open(out) as f:
        times = [json.loads(line)["ts"] for line in f]
    since = times[len(times) - max(1, len(times) // 100)]
    queries = {"full": [], "since": ["--since", since], "limit_1": ["--limit", "1"], "limit_0": ["--limit", "0"]}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in queries}
    for _ in range(reps):
        for name, args in queries.items():
            runs[name].append(read_once(cluster, config, tenant, args, out))
    result: dict[str, Any] = {"since": since, "runs": runs}
    full_keys = runs["full"][0]["keys_read"]
    for name, done in runs.items():
        result[name] = {
            "wall_s": statistics.median(r["wall_s"] for r in done),
            "cpu_s": statistics.median(r["cpu_s"] for r in done),
            "events": done[0]["events"],
            "reads_point": done[0]["reads_point"],
            "reads_range": done[0]["reads_range"],
            "keys_read": done[0]["keys_read"],
            "keys_read_pct_of_full": 100 * ratio(done[0]["keys_read"], full_keys),
        }
        print(f"  read {name}: {result[name]}", flush=True)
    return result


def run_variant(base: Path, fdb: FakeFdb, variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    cluster = Cluster(base, fdb, variant)
    print(f"fleet, {variant.name}: {args.fleet_pods} pods on {cluster.data}", flush=True)
    pods = [Pod(cluster, i, who) for i, who in enumerate(identities(args.fleet_pods))]
    try:
        started = time.monotonic()
        for pod in pods:
            pod.started()
        poll_until(lambda: all(p.settled() for p in pods), 600, interval=0.5)
        ready_s = time.monotonic() - started
        time.sleep(2)  # let the start-up's last work (index commits, first scrapes) settle
        cpu0 = sum(cpu_seconds(p.pid) for p in pods)
        time.sleep(args.fleet_idle_seconds)
        idle = (sum(cpu_seconds(p.pid) for p in pods) - cpu0) / args.fleet_idle_seconds
        print(f"  {len(pods)} pods settled in {ready_s:.1f} s; idle CPU {idle:.4f} s/s over all pods", flush=True)
        steady_files = max(1, round(args.fleet_seconds * args.fleet_rate))
        result: dict[str, Any] = {
            "pods": len(pods),
            "tenants": len({p.who.tenant for p in pods}),
            "settled_s": ready_s,
            "idle_cpu_s_per_s": idle,
            "steady": phase(cluster, pods, "steady", steady_files, args.fleet_rate, idle),
            "burst": phase(cluster, pods, "burst", args.fleet_burst, 0, idle),
        }
        result["read_tenant"] = grow(cluster, pods, pods[0].who.tenant, args.fleet_read_events)
    finally:
        for pod in pods:
            pod.stop()
    result["read"] = read_test(cluster, pods[0].config, pods[0].who.tenant, args.fleet_read_reps)
    result["store_file_mb"] = cluster.data.stat().st_size / 1e6
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet-pods", type=int, default=20, help="daemons on the one cluster (default 20)")
    parser.add_argument("--fleet-seconds", type=float, default=30.0, help="length of the steady phase")
    parser.add_argument("--fleet-rate", type=float, default=5.0, help="files a second per pod in the steady phase")
    parser.add_argument("--fleet-burst", type=int, default=1000, help="files per pod in the burst")
    parser.add_argument("--fleet-read-events", type=int, default=100_000, help="events of the read test's tenant")
    parser.add_argument("--fleet-read-reps", type=int, default=3, help="runs of each read (medians)")
    parser.add_argument("--fleet-idle-seconds", type=float, default=10.0, help="idle CPU measured over this long")
    parser.add_argument(
        "--fleet-variants",
        default=",".join(v.name for v in VARIANTS),
        help=f"variants to run, by name (known: {', '.join(v.name for v in VARIANTS)})",
    )


def run(base: Path, fdb: FakeFdb, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant asked for, each on a fresh cluster, one after the other."""
    wanted = [name.strip() for name in args.fleet_variants.split(",")]
    known = {v.name: v for v in VARIANTS}
    if unknown := [name for name in wanted if name not in known]:
        sys.exit(f"bench: unknown fleet variants {unknown}; known: {', '.join(known)}")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "load_before": os.getloadavg()[0],
        "params": {k: v for k, v in vars(args).items() if k.startswith("fleet_") and isinstance(v, int | float | str)},
        "variants": {name: run_variant(base, fdb, known[name], args) for name in wanted},
    }


Row = tuple[str, Callable[[dict[str, Any]], str]]


def _phase_rows(phase: str) -> list[Row]:
    def fig(key: str, fmt: str) -> Callable[[dict[str, Any]], str]:
        return lambda v: fmt.format(v[phase].get(key, float("nan")))

    def by_namespace(figure: str, fmt: str) -> Callable[[dict[str, Any]], str]:
        prefix = f"{figure}."
        return lambda v: ", ".join(
            f"{k[len(prefix) :]} {fmt.format(n)}" for k, n in v[phase].items() if k.startswith(prefix)
        )

    def errors(v: dict[str, Any]) -> str:
        found = v[phase]["store_errors"]
        return ", ".join(f"{code} {n:.0f}" for code, n in sorted(found.items())) or "none"

    return [
        (f"{phase}: events (files written)", lambda v: f"{v[phase]['events']:,.0f} ({v[phase]['files']:,})"),
        (f"{phase}: events/s, writer start to last commit", fig("events_per_s", "{:,.1f}")),
        (f"{phase}: keys written / event", fig("keys_per_event", "{:.2f}")),
        (f"{phase}:   by namespace", by_namespace("keys_per_event", "{:.2f}")),
        (f"{phase}: key bytes / event (without prefix)", lambda v: _with_without(v[phase], "key_bytes_per_event")),
        (f"{phase}: value bytes / event", fig("value_bytes_per_event", "{:.0f}")),
        (
            f"{phase}: stored bytes / event (without prefix)",
            lambda v: _with_without(v[phase], "stored_bytes_per_event"),
        ),
        (f"{phase}:   by namespace", by_namespace("stored_bytes_per_event", "{:.0f}")),
        (f"{phase}: commits / 1,000 events (events/commit)", lambda v: _commits(v[phase])),
        (f"{phase}: conflicts (fake) / store errors (daemons)", lambda v: f"{v[phase]['conflicts']:.0f} / {errors(v)}"),
        (f"{phase}: point + range reads / event", lambda v: _reads(v[phase])),
        (f"{phase}: keys read / event", fig("keys_read_per_event", "{:.2f}")),
        (f"{phase}: client CPU s / 1,000 events (idle out)", fig("cpu_s_per_1k", "{:.3f}")),
    ]


def _with_without(p: dict[str, Any], key: str) -> str:
    return f"{p[key]:.0f} ({p[key + '_no_prefix']:.0f})"


def _commits(p: dict[str, Any]) -> str:
    return f"{p['commits_per_1k']:.1f} ({p['events_per_commit']:.1f})"


def _reads(p: dict[str, Any]) -> str:
    return f"{p['point_reads_per_event']:.2f} + {p['range_reads_per_event']:.3f}"


def _read_rows() -> list[Row]:
    rows: list[Row] = [
        ("read: tenant events (pods)", lambda v: f"{v['read_tenant']['events']:,} ({v['read_tenant']['pods']})")
    ]
    for name, label in (
        ("full", "full read"),
        ("since", "--since the last 1%"),
        ("limit_1", "--limit 1"),
        ("limit_0", "--limit 0 (start-up only)"),
    ):

        def cell(v: dict[str, Any], name: str = name) -> str:
            r = v["read"][name]
            return (
                f"{r['wall_s']:.2f} s, {r['cpu_s']:.2f} CPU s, {r['events']:,} events, {r['keys_read']:,} keys"
                f" ({r['keys_read_pct_of_full']:.1f}%)"
            )

        rows.append((f"read: {label}: wall, CPU, events, keys read (% of full)", cell))
    return rows


def report(results: dict[str, Any]) -> str:
    """One row per figure, one column per variant."""
    rows = [*_phase_rows("steady"), *_phase_rows("burst"), *_read_rows()]
    variants = results["variants"]
    cells = [[label, *(fn(v) for v in variants.values())] for label, fn in rows]
    head = ["figure", *variants]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *cells]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the figures here too (make bench: bench/results/fleet.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="codi2-fleet-") as tmp:
        base = Path(tmp)
        results = run(base, FakeFdb(base), args)
    print()
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
