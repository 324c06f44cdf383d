"""Burst capture: a separate process creates N small files in 100 directories of a watched tree.

Runs codi2 (SQLite, as `make run` would, as a subprocess) and `inotifywait -m -r` (Debian's
inotify-tools, same tree, same event types) interleaved, REPS times each, and prints per-run figures
and medians: files recorded / files created, seconds from the writer's end to the last commit (or last
line), watcher CPU seconds, and the ratio codi2 CPU / inotifywait CPU. Absolute times on a shared
machine are noise; the ratio from the same run is the figure to quote.

    python bench/burst.py [--files 100000] [--reps 3] [--json bench/results/burst.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIRS = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRITER = """
import os, sys
root, n, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    with open(os.path.join(root, f"d{i % dirs}", f"f{i}"), "wb") as f:
        f.write(b"x")
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def ensure_inotifywait() -> str:
    found = shutil.which("inotifywait")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "inotify-tools"], check=True)
        found = shutil.which("inotifywait")
    if not found:
        sys.exit("bench: inotifywait not found; install Debian's inotify-tools")
    return found


def fresh_tree(base: Path) -> Path:
    tree = base / "ws"
    shutil.rmtree(tree, ignore_errors=True)
    for d in range(DIRS):
        (tree / f"d{d}").mkdir(parents=True)
    return tree


def write_files(tree: Path, n: int) -> tuple[float, float]:
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", WRITER, str(tree), str(n), str(DIRS)], check=True)
    return start, time.monotonic()


def run_codi2(base: Path, n: int) -> dict[str, float]:
    tree = fresh_tree(base)
    db = base / "audit.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    config = base / "codi2.toml"
    config.write_text(
        f'[server]\nbind_addr = "127.0.0.1:0"\n[monitoring]\nwatch_paths = [{json.dumps(str(tree))}]\n'
        f'[storage]\nbackend = "sqlite"\nsqlite_path = {json.dumps(str(db))}\n'
        f'[state]\ndir = {json.dumps(str(base / "state"))}\n[logging]\nlevel = "info"\nformat = "json"\n'
    )
    log = base / "codi2.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "codi2", "--config", str(config), "--user-id", "bench", "--tenant-id", "bench"],
            stderr=stderr,
        )
    try:
        wait_ready(log)
        cpu_before = cpu_seconds(proc.pid)
        _, writer_end = write_files(tree, n)
        recorded, last_change = poll_until_stable(lambda: count_created(db), n)
        cpu = cpu_seconds(proc.pid) - cpu_before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {"recorded": recorded / n, "lag_s": max(0.0, last_change - writer_end), "cpu_s": cpu}


def wait_ready(log: Path) -> None:
    """codi2 logs `codi2_ready` once every watch is in place."""
    deadline = time.monotonic() + 60
    while b'"codi2_ready"' not in log.read_bytes():
        if time.monotonic() > deadline:
            sys.exit(f"bench: codi2 did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def count_created(db: Path) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute("SELECT count(*) FROM events WHERE action = 'created'").fetchone()[0]


def poll_until_stable(count, target: int, quiet_s: float = 5.0) -> tuple[int, float]:
    """Poll `count()` until it reaches `target` or stops growing for `quiet_s`; return it and when it last grew."""
    last_value, last_change = -1, time.monotonic()
    while True:
        value = count()
        now = time.monotonic()
        if value != last_value:
            last_value, last_change = value, now
        if value >= target or now - last_change > quiet_s:
            return value, last_change
        time.sleep(0.05)


def run_inotifywait(binary: str, base: Path, n: int) -> dict[str, float]:
    tree = fresh_tree(base)
    out = base / "inotifywait.out"
    events = "create,modify,close_write,attrib,moved_from,moved_to,delete"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            [binary, "-m", "-r", "-q", "-e", events, "--format", "%e %w%f", str(tree)],
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.0)  # "Watches established" goes to stderr; -q hides it, a second is plenty for 100 dirs
            cpu_before = cpu_seconds(proc.pid)
            _, writer_end = write_files(tree, n)
            recorded, last_change = poll_until_stable(lambda: count_lines(out), n)
            cpu = cpu_seconds(proc.pid) - cpu_before
        finally:
            proc.terminate()
            proc.wait(30)
    return {"recorded": recorded / n, "lag_s": max(0.0, last_change - writer_end), "cpu_s": cpu}


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.startswith(b"CREATE "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "burst.json")
    args = parser.parse_args()
    binary = ensure_inotifywait()
    runs: dict[str, list[dict[str, float]]] = {"codi2": [], "inotifywait": []}
    with tempfile.TemporaryDirectory(prefix="codi2-bench-") as tmp:
        base = Path(tmp)
        for rep in range(args.reps):
            for name in ("codi2", "inotifywait"):
                result = run_codi2(base, args.files) if name == "codi2" else run_inotifywait(binary, base, args.files)
                runs[name].append(result)
                print(
                    f"rep {rep + 1} {name:<12} recorded {result['recorded']:.4f}  "
                    f"lag {result['lag_s']:6.2f} s  cpu {result['cpu_s']:6.2f} s",
                    flush=True,
                )
    ratios = [c["cpu_s"] / i["cpu_s"] for c, i in zip(runs["codi2"], runs["inotifywait"], strict=True)]
    summary = {
        name: {key: statistics.median(r[key] for r in rs) for key in ("recorded", "lag_s", "cpu_s")}
        for name, rs in runs.items()
    }
    summary["cpu_ratio_codi2_over_inotifywait"] = {"median": statistics.median(ratios), "runs": ratios}
    print(f"\nburst capture, {args.files} files in {DIRS} dirs, medians of {args.reps} interleaved reps")
    print(f"{'watcher':<12} {'recorded':>9} {'lag s':>7} {'cpu s':>7}")
    for name in ("codi2", "inotifywait"):
        s = summary[name]
        print(f"{name:<12} {s['recorded']:>9.4f} {s['lag_s']:>7.2f} {s['cpu_s']:>7.2f}")
    each = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"cpu ratio codi2 / inotifywait: median {statistics.median(ratios):.2f} (runs {each})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"files": args.files, "reps": args.reps, "runs": runs, "summary": summary}, indent=2)
    )
    return 0 if all(r["recorded"] == 1.0 for r in runs["codi2"]) else 1


if __name__ == "__main__":
    sys.exit(main())
