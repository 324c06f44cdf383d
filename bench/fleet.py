"""The fleet benchmark (issue #23): N `codi2 run` daemons, one per pod, on one FoundationDB cluster (the fake
libfdb_c: one SQLite file every process shares), to measure what each event costs the cluster with a key
layout: keys and bytes stored, commits, conflicts, reads, client CPU and events/s, in a steady phase (every
pod ~5 files a second) and a burst (1,000 files per pod at once); then one 1,000-event batch in a pod of its
own (its commits), and a read test on one tenant grown to ~100k events (`codi2 events --since` the last 1%
and `--limit 1` against a full read). Each variant runs all of it on a fresh cluster and gets a column:
layout v1 is the previous release's code (a checkout of `--fleet-v1-ref`, made and removed by the bench),
layout v2 this tree's; the table puts v2/v1 beside issue #23's targets.

    python bench/fleet.py [--fleet-pods 20] [--fleet-seconds 30] [--fleet-rate 5] [--fleet-burst 1000]
        [--fleet-read-events 100000] [--fleet-variants v1,v2] [--fleet-v1-ref REF] [--json PATH]

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
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import fdb.tuple as fdbtuple
import msgspec
from common import REPO, Code, FakeFdb, checkout, cpu_seconds, git, health_port, poll_until, scrape

PANELS = 10  # directories a pod's files are spread over: src/components/panel_NN
PODS_PER_TENANT = 5
K8S_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes draws generated name suffixes from
GROW_ROUND = 5000  # files per pod between waits while a tenant grows: well under the kernel's inotify queue
TAIL_PAUSE_S = 4.0  # before the read tenant's last 1%: more than CLOCK_SKEW_S (2 s) + the `t` key's 1 s
QUIET_S = 0.3  # no commit for this long: time to ask the daemons whether that was the last
COMMITTED = "codi2_events_committed_total"
# The last commit before "Merge branch 'fdbv2'" (12dfe4d, its first parent): the release writing layout v1.
V1_REF = "be46bb7"
BATCH = 1000  # events of the one-batch test: its pod's [batching] max_events
BATCH_DELAY_MS = 20_000  # that pod's max_delay_ms: long enough that max_events alone cuts its batch
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
    """What one column measures: the code that runs (`ref`, a commit checked out for the run, or None for
    this tree), TOML keys merged into every daemon's and reader's config (section -> key -> value) and
    environment variables for them. `key` is what `--fleet-variants` names."""

    key: str
    name: str
    ref: str | None = None
    toml: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> tuple[str, ...]:
        return tuple(self.toml.get("foundationdb", {}).get("root_prefix", ("codi2",)))


def variants(v1_ref: str) -> tuple[Variant, ...]:
    """Layout v1 can only be written by the code before v2 landed (no setting selects it), so its variant
    runs that release; v2 is this tree. Same ids, writer schedule and settings otherwise."""
    sha = git("rev-parse", "--short=7", f"{v1_ref}^{{commit}}")
    return (Variant("v1", f"v1 (release {sha})", ref=v1_ref), Variant("v2", "v2 (this tree)"))


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
    """One fake cluster for one variant: a fresh data file, the code every process on it runs, and their
    config and environment."""

    def __init__(self, base: Path, fdb: FakeFdb, variant: Variant, code: Code) -> None:
        self.dir = base / re.sub(r"[^a-z0-9]+", "-", variant.name.lower()).strip("-")
        self.dir.mkdir(parents=True)
        self.fdb = fdb
        self.variant = variant
        self.code = code
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
        """Every process runs the variant's code and counts its reads (FAKEFDB_COUNT_READS=1) into the shared
        counters."""
        return {**os.environ, **self.code.env(), **self.fdb.env(self.data, count_reads=True), **self.variant.env}

    def run(self, args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """`python -m codi2 ARGS` with the variant's code, from its tree."""
        return subprocess.Popen([sys.executable, "-m", "codi2", *args], cwd=self.code.root, **popen)

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
        """One tenant's stored events, in either layout: its v1 `audit` keys (an event too long for one value
        adds chunk keys elsewhere) and the `done` of its v2 `c` values (versionstamp ‖ msgpack [1, done, …])."""
        audit, c = (self.root + fdbtuple.pack((tenant, ns)) for ns in ("audit", "c"))
        with closing(sqlite3.connect(self.data, timeout=60)) as conn:
            v1: int = conn.execute(
                "SELECT count(*) FROM kv WHERE key > ? AND key < ?", (audit + b"\x00", audit + b"\xff")
            ).fetchone()[0]
            headers = conn.execute("SELECT value FROM kv WHERE key > ? AND key < ?", (c + b"\x00", c + b"\xff"))
            v2 = sum(int(msgspec.msgpack.decode(value[10:])[1]) for (value,) in headers)
        return v1 + v2


class Pod:
    """`codi2 run` for one pod: its workspace, staging directory (for the writer), state dir and identity."""

    def __init__(
        self, cluster: Cluster, name: str, who: Identity, sections: dict[str, dict[str, Any]] | None = None
    ) -> None:
        self.who = who
        self.dir = cluster.dir / name
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
                **(sections or {}),
            },
        )
        self.log = self.dir / "codi2.log"
        with open(self.log, "wb") as stderr:
            self.proc = cluster.run(
                [
                    *("run", "--config", str(self.config)),
                    *("--tenant-id", who.tenant, "--user-id", who.user, "--session-id", who.session),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**cluster.env(), "HOSTNAME": who.pod},
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
        "point_reads_per_commit": ratio(counted("reads_point"), counted("commits")),
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


def one_batch(cluster: Cluster) -> dict[str, Any]:
    """BATCH files at once into a pod of its own (its own tenant), whose batch is cut by `max_events` =
    BATCH alone (its window, BATCH_DELAY_MS, outlasts the writer): what the store did for that batch."""
    pod = Pod(
        cluster,
        "batch",
        identities(1, seed=1000)[0],
        {"batching": {"max_events": BATCH, "max_delay_ms": BATCH_DELAY_MS}},
    )
    try:
        pod.started()
        poll_until(pod.settled, 600, interval=0.5)
        metrics0, counters0 = pod.metrics(), cluster.counters()
        write([pod], "batch", BATCH, 0)
        until_committed(cluster, [pod], [metrics0[COMMITTED] + BATCH], timeout=300 + BATCH_DELAY_MS / 1000)
        events = pod.metrics()[COMMITTED] - metrics0[COMMITTED]
        counters = cluster.counters()
    finally:
        pod.stop()
    result: dict[str, Any] = {"events": events}
    for name in ("commits", "commit_attempts", "conflicts", "reads_point", "reads_range"):
        result[name] = counters.get(name, 0) - counters0.get(name, 0)
    result["commits_per_1k"] = ratio(1000 * result["commits"], events)
    print(f"  one batch of {BATCH} events: {result}", flush=True)
    return result


def grow(cluster: Cluster, pods: Sequence[Pod], tenant: str, target: int) -> dict[str, Any]:
    """The tenant's pods write files until it holds about `target` events, in rounds of GROW_ROUND files per
    pod, each committed before the next, so no inotify queue overflows. Its last 1% is written after a pause
    of TAIL_PAUSE_S: the bench writes in seconds what a tenant writes in hours, and without the pause the
    time of the read test's `--since` would fall within v2's clock-skew margin of most of the trail."""
    mine = [p for p in pods if p.who.tenant == tenant]
    have = cluster.tenant_events(tenant)
    started, rounds = time.monotonic(), 0
    tail = math.ceil(target // 100 / len(mine))
    remaining = max(0, math.ceil((target - have) / len(mine)) - tail)
    for part in ("body", "tail"):
        while remaining:
            files = min(GROW_ROUND, remaining)
            before = [p.metrics()[COMMITTED] for p in mine]
            write(mine, f"grow{rounds:02d}", files, 0)
            until_committed(cluster, mine, [b + files for b in before], timeout=300 + files * len(mine) * 0.02)
            remaining -= files
            rounds += 1
        if part == "body":
            time.sleep(TAIL_PAUSE_S)
            remaining = tail
    events = cluster.tenant_events(tenant)
    print(f"  tenant {tenant}: {events:,} events ({events - have:,} written in {time.monotonic() - started:.1f} s)")
    return {
        "tenant": tenant,
        "pods": len(mine),
        "events": events,
        "tail_events": tail * len(mine),
        "grow_s": time.monotonic() - started,
        "config": str(mine[0].config),  # what the reads run with: a pod's, as its user's `codi2 events` would
    }


def read_once(cluster: Cluster, config: Path, tenant: str, args: list[str], out: Path) -> dict[str, Any]:
    """`codi2 events` in a process of its own, its reads counted: wall and CPU time, events printed."""
    counters0 = cluster.counters()
    err = out.with_suffix(".err")
    started = time.monotonic()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = cluster.run(
            [*("events", "--config", str(config), "--tenant-id", tenant, "--format", "jsonl"), *args],
            stdout=stdout,
            stderr=stderr,
            env=cluster.env(),
        )
        _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: codi2 events {' '.join(args)} failed: {err.read_text()[-2000:]}")
    counters = cluster.counters()
    with open(out, "rb") as f:
        events = sum(1 for _ in f)
    counted = {
        n: counters.get(n, 0) - counters0.get(n, 0) for n in ("reads_point", "reads_range", "keys_read", "bytes_read")
    }
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
    # what `--since` must print: every event of the full read at or after that time, wherever it sorts
    expected = sum(1 for t in times if datetime.fromisoformat(t) >= datetime.fromisoformat(since))
    queries = {"full": [], "since": ["--since", since], "limit_1": ["--limit", "1"], "limit_0": ["--limit", "0"]}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in queries}
    for _ in range(reps):
        for name, args in queries.items():
            runs[name].append(read_once(cluster, config, tenant, args, out))
    result: dict[str, Any] = {"since": since, "since_expected_events": expected, "runs": runs}
    full = runs["full"][0]
    for name, done in runs.items():
        result[name] = {
            "wall_s": statistics.median(r["wall_s"] for r in done),
            "cpu_s": statistics.median(r["cpu_s"] for r in done),
            "events": done[0]["events"],
            "reads_point": done[0]["reads_point"],
            "reads_range": done[0]["reads_range"],
            "keys_read": done[0]["keys_read"],
            "keys_read_pct_of_full": 100 * ratio(done[0]["keys_read"], full["keys_read"]),
            "bytes_read": done[0]["bytes_read"],
            "bytes_read_pct_of_full": 100 * ratio(done[0]["bytes_read"], full["bytes_read"]),
        }
        print(f"  read {name}: {result[name]}", flush=True)
    if result["since"]["events"] != expected:
        print(f"  read since: printed {result['since']['events']} events, expected {expected}", flush=True)
    # The target's time: what `--since` takes beyond `--limit 1` (start-up, the store opened, a first page)
    # against what a full read takes beyond it.
    beyond = result["limit_1"]["wall_s"]
    result["since_beyond_limit_1_pct_of_full"] = 100 * ratio(
        result["since"]["wall_s"] - beyond, result["full"]["wall_s"] - beyond
    )
    return result


def run_variant(base: Path, fdb: FakeFdb, variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """The whole scenario on a fresh cluster, every process running the variant's code."""
    code = (
        checkout(variant.ref, base)
        if variant.ref
        else nullcontext(Code(REPO, f"this tree ({git('rev-parse', '--short=7', 'HEAD')})"))
    )
    with code as running:
        cluster = Cluster(base, fdb, variant, running)
        module = running.module_file(cluster.env())
        print(f"fleet, {variant.name}: {running.revision}, codi2 from {module}", flush=True)
        print(f"  {args.fleet_pods} pods on {cluster.data}", flush=True)
        result: dict[str, Any] = {"key": variant.key, "code": running.revision, "codi2_file": str(module)}
        result.update(fleet(cluster, args))
        tenant = result["read_tenant"]
        result["read"] = read_test(cluster, Path(tenant["config"]), tenant["tenant"], args.fleet_read_reps)
        result["store_file_mb"] = cluster.data.stat().st_size / 1e6
    return result


def fleet(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """The pods' part: start-up and idle, the steady phase, the burst, the one batch, the read tenant grown;
    every daemon stopped at the end."""
    pods = [Pod(cluster, f"pod{i:03d}", who) for i, who in enumerate(identities(args.fleet_pods))]
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
        return {
            "pods": len(pods),
            "tenants": len({p.who.tenant for p in pods}),
            "settled_s": ready_s,
            "idle_cpu_s_per_s": idle,
            "steady": phase(cluster, pods, "steady", steady_files, args.fleet_rate, idle),
            "burst": phase(cluster, pods, "burst", args.fleet_burst, 0, idle),
            "batch": one_batch(cluster),
            "read_tenant": grow(cluster, pods, pods[0].who.tenant, args.fleet_read_events),
        }
    finally:
        for pod in pods:
            pod.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet-pods", type=int, default=20, help="daemons on the one cluster (default 20)")
    parser.add_argument("--fleet-seconds", type=float, default=30.0, help="length of the steady phase")
    parser.add_argument("--fleet-rate", type=float, default=5.0, help="files a second per pod in the steady phase")
    parser.add_argument("--fleet-burst", type=int, default=1000, help="files per pod in the burst")
    parser.add_argument("--fleet-read-events", type=int, default=100_000, help="events of the read test's tenant")
    parser.add_argument("--fleet-read-reps", type=int, default=3, help="runs of each read (medians)")
    parser.add_argument("--fleet-idle-seconds", type=float, default=10.0, help="idle CPU measured over this long")
    parser.add_argument("--fleet-variants", default="v1,v2", help="variants to run, in order (default v1,v2)")
    parser.add_argument(
        "--fleet-v1-ref",
        default=V1_REF,
        help=f"the commit whose code writes layout v1, checked out for the run (default {V1_REF}: the last before v2)",
    )


def selected(args: argparse.Namespace) -> list[Variant]:
    """The variants `--fleet-variants` names, their refs resolved: called before anything runs, so that a
    wrong name or ref fails at once rather than after the other scenarios."""
    wanted = [key.strip() for key in args.fleet_variants.split(",")]
    known = {v.key: v for v in variants(args.fleet_v1_ref)}
    if unknown := [key for key in wanted if key not in known]:
        sys.exit(f"bench: unknown fleet variants {unknown}; known: {', '.join(known)}")
    return [known[key] for key in wanted]


def run(base: Path, fdb: FakeFdb, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant asked for, each on a fresh cluster, one after the other."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "load_before": os.getloadavg()[0],
        "params": {k: v for k, v in vars(args).items() if k.startswith("fleet_") and isinstance(v, int | float | str)},
        "variants": {v.name: run_variant(base, fdb, v, args) for v in selected(args)},
    }


Results = dict[str, Any]


@dataclass(frozen=True)
class Row:
    """One figure of the table: its cell for a variant's results; the number the v2/v1 column divides, if
    any; and issue #23's target, if any: its text and whether v2's results meet it (v1's given too)."""

    label: str
    cell: Callable[[Results], str]
    value: Callable[[Results], float] | None = None
    target: str = ""
    met: Callable[[Results, Results], bool] | None = None


def _phase_rows(phase: str) -> list[Row]:
    def fig(key: str, fmt: str) -> Callable[[Results], str]:
        return lambda v: fmt.format(v[phase].get(key, float("nan")))

    def val(key: str) -> Callable[[Results], float]:
        return lambda v: float(v[phase].get(key, float("nan")))

    def by_namespace(figure: str, fmt: str) -> Callable[[Results], str]:
        prefix = f"{figure}."
        return lambda v: ", ".join(
            f"{k[len(prefix) :]} {fmt.format(n)}" for k, n in v[phase].items() if k.startswith(prefix)
        )

    def errors(v: Results) -> str:
        found = v[phase]["store_errors"]
        return ", ".join(f"{code} {n:.0f}" for code, n in sorted(found.items())) or "none"

    def stored(new: Results, old: Results) -> bool:
        return bool(new[phase]["stored_bytes_per_event"] <= 0.6 * old[phase]["stored_bytes_per_event"])

    keys = Row(f"{phase}: keys written / event", fig("keys_per_event", "{:.3f}"), val("keys_per_event"))
    if phase == "burst":
        keys = Row(keys.label, keys.cell, keys.value, "≤ 1.2", lambda new, _: new[phase]["keys_per_event"] <= 1.2)
    return [
        Row(f"{phase}: events (files written)", lambda v: f"{v[phase]['events']:,.0f} ({v[phase]['files']:,})"),
        Row(f"{phase}: events/s, writer start to last commit", fig("events_per_s", "{:,.1f}"), val("events_per_s")),
        keys,
        Row(f"{phase}:   by namespace", by_namespace("keys_per_event", "{:.3f}")),
        Row(f"{phase}: key bytes / event", fig("key_bytes_per_event", "{:.0f}"), val("key_bytes_per_event")),
        Row(f"{phase}: value bytes / event", fig("value_bytes_per_event", "{:.0f}"), val("value_bytes_per_event")),
        Row(
            f"{phase}: stored bytes / event",
            fig("stored_bytes_per_event", "{:.0f}"),
            val("stored_bytes_per_event"),
            "≤ 0.6 of v1",
            stored,
        ),
        Row(
            f"{phase}:   without the (root, tenant) prefix",
            fig("stored_bytes_per_event_no_prefix", "{:.0f}"),
            val("stored_bytes_per_event_no_prefix"),
        ),
        Row(f"{phase}:   by namespace", by_namespace("stored_bytes_per_event", "{:.0f}")),
        Row(f"{phase}: commits / 1,000 events (events/commit)", _commits(phase), val("commits_per_1k")),
        Row(
            f"{phase}: conflicts (fake) / store errors (daemons)",
            lambda v: f"{v[phase]['conflicts']:.0f} / {errors(v)}",
        ),
        Row(
            f"{phase}: point reads / event (a commit) + range",
            _reads(phase),
            val("point_reads_per_event"),
            "≈ 1 / batch size",
            lambda new, _: new[phase]["point_reads_per_commit"] <= 1.05,
        ),
        Row(f"{phase}: keys read / event", fig("keys_read_per_event", "{:.3f}"), val("keys_read_per_event")),
        Row(f"{phase}: client CPU s / 1,000 events (idle out)", fig("cpu_s_per_1k", "{:.3f}"), val("cpu_s_per_1k")),
    ]


def _commits(phase: str) -> Callable[[Results], str]:
    return lambda v: f"{v[phase]['commits_per_1k']:.1f} ({v[phase]['events_per_commit']:.1f})"


def _reads(phase: str) -> Callable[[Results], str]:
    def cell(v: Results) -> str:
        p = v[phase]
        return (
            f"{p['point_reads_per_event']:.3f} ({p['point_reads_per_commit']:.2f}) + {p['range_reads_per_event']:.3f}"
        )

    return cell


def _batch_rows() -> list[Row]:
    def cell(v: Results) -> str:
        b = v["batch"]
        return (
            f"{b['events']:,.0f} events: {b['commits']} commit(s), {b['commit_attempts']} attempt(s),"
            f" {b['reads_point']} point reads"
        )

    return [
        Row(
            f"one batch (1 pod, max_events {BATCH:,}): commits / 1,000 events",
            lambda v: f"{v['batch']['commits_per_1k']:.2f}",
            lambda v: float(v["batch"]["commits_per_1k"]),
            "1",
            lambda new, _: new["batch"]["commits_per_1k"] <= 1.0,
        ),
        Row("one batch: events, commits, attempts, point reads", cell),
    ]


def _read_rows() -> list[Row]:
    rows = [Row("read: tenant events (pods)", lambda v: f"{v['read_tenant']['events']:,} ({v['read_tenant']['pods']})")]
    for name, label in (
        ("full", "full read"),
        ("since", "--since the last 1%"),
        ("limit_1", "--limit 1"),
        ("limit_0", "--limit 0 (start-up only)"),
    ):

        def cell(v: Results, name: str = name) -> str:
            r = v["read"][name]
            return (
                f"{r['wall_s']:.2f} s, {r['cpu_s']:.2f} CPU s, {r['events']:,} events, {r['keys_read']:,} keys"
                f" ({r['keys_read_pct_of_full']:.1f}%)"
            )

        def wall(v: Results, name: str = name) -> float:
            return float(v["read"][name]["wall_s"])

        rows.append(Row(f"read: {label}: wall, CPU, events, keys read (% of full)", cell, wall))
    rows += [
        Row(
            "read: --since events printed / expected (a full read's at or after)",
            lambda v: f"{v['read']['since']['events']:,} / {v['read']['since_expected_events']:,}",
            target="all",
            met=lambda new, _: new["read"]["since"]["events"] == new["read"]["since_expected_events"],
        ),
        Row(
            "read: --since keys read, % of a full read's",
            lambda v: f"{v['read']['since']['keys_read_pct_of_full']:.1f}%",
            lambda v: float(v["read"]["since"]["keys_read_pct_of_full"]),
            "≤ 5%",
            lambda new, _: new["read"]["since"]["keys_read_pct_of_full"] <= 5,
        ),
        Row(
            "read: --since bytes read, % of a full read's",
            lambda v: f"{v['read']['since']['bytes_read_pct_of_full']:.1f}%",
            lambda v: float(v["read"]["since"]["bytes_read_pct_of_full"]),
        ),
        Row(
            "read: --since time beyond --limit 1, % of a full read's",
            lambda v: f"{v['read']['since_beyond_limit_1_pct_of_full']:.1f}%",
            lambda v: float(v["read"]["since_beyond_limit_1_pct_of_full"]),
            "≤ 20%",
            lambda new, _: new["read"]["since_beyond_limit_1_pct_of_full"] <= 20,
        ),
    ]
    return rows


def report(results: Results) -> str:
    """One row per figure, one column per variant; with both layouts, v2/v1 and whether v2 meets the target."""
    store = Row(
        "store: the fake's data file at the end, MB",
        lambda v: f"{v['store_file_mb']:.1f}",
        lambda v: float(v["store_file_mb"]),
    )
    rows = [*_phase_rows("steady"), *_phase_rows("burst"), *_batch_rows(), *_read_rows(), store]
    variants = results["variants"]
    by_key = {v["key"]: v for v in variants.values()}
    old, new = by_key.get("v1"), by_key.get("v2")
    both = old is not None and new is not None

    def extra(row: Row) -> list[str]:
        if old is None or new is None:
            return [row.target]
        quotient = ratio(row.value(new), row.value(old)) if row.value else float("nan")
        verdict = ("yes" if row.met(new, old) else "NO") if row.met else ""
        return ["" if math.isnan(quotient) else f"{quotient:.3f}", row.target, verdict]

    head = ["figure", *variants, *(["v2/v1", "target", "met"] if both else ["target"])]
    cells = [[row.label, *(row.cell(v) for v in variants.values()), *extra(row)] for row in rows]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *cells]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the figures here too (make bench: bench/results/fleet.json)")
    args = parser.parse_args()
    selected(args)
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
