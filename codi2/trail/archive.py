"""The archive `codi2 archive` writes before a prune: self-describing files a verifier checks alone
(docs/retention.md).

A directory holding `manifest.json` (written last: an archive without one is incomplete) and gzip'd JSON
lines. Each line of a stream's file is one batch: its header and its records, the exact bytes its link
covers (`codi2.trail.events.encode_events`), base64. So the chain is checked from the files alone, with
nothing re-encoded: each batch's link recomputed, every batch following the one before it, the first
following the stream's earlier horizon (the end of the archive before), the last being the horizon the
prune then writes. Events in no batch (written before chaining) are kept in a file of their own. The
manifest names every file with its sha256.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from codi2.stores.base import RetentionPlan, Sink
from codi2.trail.chain import ZERO, ChainKey, expected_link
from codi2.trail.events import BatchHeader, encode_event, encode_events, rfc3339

FORMAT = "codi2-archive"
VERSION = 1
MANIFEST = "manifest.json"
BATCHES_PER_FILE = 1000  # about 100 MB of records at most: a file an operator can still move and check
_records = msgspec.msgpack.Decoder(list[msgspec.Raw])


@dataclass
class ArchiveBreak:
    kind: str  # bad_manifest, missing_file, unlisted_file, bad_sha256, missing_batch, altered, bad_link, …
    stream_id: str | None
    batch: int | None
    detail: str


@dataclass
class ArchiveReport:
    path: str
    tenant_id: str | None
    before: str | None
    streams: int = 0
    batches: int = 0
    events: int = 0
    unchained_events: int = 0
    breaks: list[ArchiveBreak] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


def _header_json(h: BatchHeader) -> dict[str, Any]:
    return {
        "stream_id": h.stream_id,
        "number": h.number,
        "ts": h.ts,
        "prev": h.prev.hex(),
        "link": h.link.hex(),
        "key_id": h.key_id,
        "events": h.events,
    }


def _header(d: dict[str, Any]) -> BatchHeader:
    return BatchHeader(
        d["stream_id"],
        d["number"],
        d["ts"],
        bytes.fromhex(d["prev"]),
        bytes.fromhex(d["link"]),
        d["key_id"],
        d["events"],
    )


class _Writer:
    """Gzip'd JSON lines, one file per BATCHES_PER_FILE lines, each file's sha256 noted for the manifest."""

    def __init__(self, out: Path, stem: str, files: dict[str, dict[str, Any]]) -> None:
        self.out, self.stem, self.files = out, stem, files
        self.names: list[str] = []
        self._file: gzip.GzipFile | None = None
        self._raw: Any = None
        self._lines = 0

    def write(self, line: dict[str, Any]) -> None:
        if self._file is None or self._lines == BATCHES_PER_FILE:
            self.close()
            name = f"{self.stem}-{len(self.names) + 1:05d}.jsonl.gz"
            self.names.append(name)
            self._raw = open(self.out / name, "xb")  # noqa: SIM115 - closed in close()
            self._file = gzip.GzipFile(fileobj=self._raw, mode="wb", mtime=0, filename="")
            self._lines = 0
        self._file.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        self._lines += 1

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        name = self.names[-1]
        self.files[name] = {"sha256": _sha256(self.out / name), "bytes": (self.out / name).stat().st_size}
        self._file = None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write(sink: Sink, plan: RetentionPlan, out: Path) -> dict[str, Any]:
    """Archive what pruning `plan` removes into `out` (an empty or new directory); returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    tenant, files = plan.tenant_id, dict[str, dict[str, Any]]()
    streams = []
    for i, (stream_id, p) in enumerate(sorted(plan.streams.items()), 1):
        writer, after = _Writer(out, f"stream-{i:05d}", files), p.previous.number if p.previous else 0
        for batch in sink.batches(tenant, stream_id):
            if after < batch.header.number <= p.horizon.number:
                records = encode_events(e for _, e in sink.batch_events(tenant, batch))
                writer.write({"header": _header_json(batch.header), "records": base64.b64encode(records).decode()})
        writer.close()
        streams.append(
            {
                "stream_id": stream_id,
                "after": None if p.previous is None else {"number": p.previous.number, "link": p.previous.link.hex()},
                "last": {"number": p.horizon.number, "link": p.horizon.link.hex(), "ts": p.horizon.ts},
                "batches": p.batches,
                "events": p.events,
                "files": writer.names,
            }
        )
    unchained, count = _Writer(out, "unchained", files), 0
    for event in sink.unchained_before(plan):
        unchained.write({"record": base64.b64encode(encode_event(event)).decode()})
        count += 1
    unchained.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tenant_id": tenant,
        "before": rfc3339(plan.before.timestamp()),
        "created": rfc3339(time.time()),
        "streams": streams,
        "unchained": {"events": count, "files": unchained.names},
        "files": files,
    }
    partial = out / (MANIFEST + ".tmp")
    with partial.open("x") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    partial.rename(out / MANIFEST)
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the archive at `path`; ValueError with one line when there is none to read."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except OSError as exc:
        raise ValueError(f"{path / MANIFEST}: {exc.strerror or exc} (an archive without it is incomplete)") from None
    except ValueError as exc:
        raise ValueError(f"{path / MANIFEST}: not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path / MANIFEST}: not a {FORMAT} version {VERSION} manifest")
    return manifest


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rb") as f:
        for line in f:
            yield json.loads(line)


def verify_archive(path: Path, keys: Sequence[ChainKey] = ()) -> ArchiveReport:
    """Check an archive alone: every file listed and intact, every stream's chain whole from the horizon
    before it to the one it records, every batch's link over its records."""
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        return ArchiveReport(str(path), None, None, breaks=[ArchiveBreak("bad_manifest", None, None, str(exc))])
    report = ArchiveReport(str(path), manifest.get("tenant_id"), manifest.get("before"))
    try:
        _check(path, manifest, {k.id: k for k in keys}, report)
    except (KeyError, TypeError, ValueError, OSError, EOFError, msgspec.DecodeError) as exc:
        report.breaks.append(ArchiveBreak("unreadable", None, None, f"{type(exc).__name__}: {exc}"))
    return report


def _check(path: Path, manifest: dict[str, Any], keyring: dict[str, ChainKey], report: ArchiveReport) -> None:
    listed: dict[str, dict[str, Any]] = manifest["files"]
    here = {p.name for p in path.iterdir()} - {MANIFEST}
    for name in sorted(here - listed.keys()):
        report.breaks.append(ArchiveBreak("unlisted_file", None, None, f"{name} is not in the manifest"))
    intact = set()
    for name, facts in sorted(listed.items()):
        if name not in here:
            report.breaks.append(ArchiveBreak("missing_file", None, None, f"{name} is listed but not there"))
        elif _sha256(path / name) != facts["sha256"]:
            report.breaks.append(ArchiveBreak("bad_sha256", None, None, f"{name} is not what the manifest lists"))
        else:
            intact.add(name)
    for stream in manifest["streams"]:
        report.streams += 1
        _check_stream(path, stream, keyring, intact, report)
    unchained = manifest["unchained"]
    count = sum(1 for name in unchained["files"] if name in intact for _ in _lines(path / name))
    report.unchained_events = count
    if count != unchained["events"]:
        detail = f"{count} events in no batch where the manifest lists {unchained['events']}"
        report.breaks.append(ArchiveBreak("event_removed", None, None, detail))


def _check_stream(
    path: Path, stream: dict[str, Any], keyring: dict[str, ChainKey], intact: set[str], report: ArchiveReport
) -> None:
    stream_id: str = stream["stream_id"]
    after = stream["after"]
    number, link = (0, ZERO) if after is None else (after["number"], bytes.fromhex(after["link"]))

    def broken(kind: str, batch: int | None, detail: str) -> None:
        report.breaks.append(ArchiveBreak(kind, stream_id, batch, detail))

    for name in stream["files"]:
        if name not in intact:
            continue  # named above; what follows it in the stream shows as a missing batch
        for line in _lines(path / name):
            h, records = _header(line["header"]), base64.b64decode(line["records"], validate=True)
            if h.stream_id != stream_id:
                broken("bad_header", h.number, f"batch of stream {h.stream_id} in this stream's file {name}")
                continue
            if h.prev != link or h.number != number + 1:
                broken("missing_batch", h.number, f"it does not follow batch {number} (link {link.hex()[:16]}…)")
            number, link = h.number, h.link
            report.batches += 1
            count = len(_records.decode(records))
            report.events += count
            if count != h.events:
                broken("event_removed" if count < h.events else "event_inserted", h.number, f"{count} of {h.events}")
                continue
            key = keyring.get(h.key_id) if h.key_id is not None else None
            if h.key_id is not None and key is None:
                broken("unknown_key", h.number, f"sealed with key {h.key_id}: give its --key-file to check it")
            elif not hmac.compare_digest(expected_link(h, records, key), h.link):
                broken("altered", h.number, "its records or header are not what its link was computed over")
    last = stream["last"]
    if (number, link.hex()) != (last["number"], last["link"]):
        broken("missing_batch", last["number"], f"the archive ends at batch {number}, its manifest at {last['number']}")


def render(report: ArchiveReport) -> str:
    lines = [f"  BREAK {b.kind} (stream {b.stream_id or '-'}, batch {b.batch}): {b.detail}" for b in report.breaks]
    verdict = "intact" if report.ok else f"{len(report.breaks)} breaks"
    lines.append(
        f"archive {report.path} (tenant {report.tenant_id or '-'}, before {report.before or '-'}): {verdict}"
        f" (streams {report.streams}, batches {report.batches}, events {report.events},"
        f" events in no batch {report.unchained_events})"
    )
    return "\n".join(lines)
