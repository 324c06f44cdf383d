"""`codi2 verify`: check a tenant's trail against the hash chains of its streams (docs/trail-format.md),
and optionally the workspace on a disk against the trail.

The tenant's trail is scanned first (so that an event committed meanwhile, with its batch, is never taken
for one in no batch). Then each
stream is walked in batch order: the chain's structure is judged from the stored headers alone (batch 1
follows no one, every other batch follows the link of the batch before it), and every batch journaled
from `since` on is read back, counted and hashed. Last, every event of the scan must belong to a checked
batch. Each finding is a `Break` whose kind names what a store that lost, gained, reordered or altered
something looks like; a stream's tail cut off is the one thing a chain cannot show by itself: compare the
head printed here with `/status` `chain.head`.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from codi2.config import Settings
from codi2.disk.ignore import IgnoreRules
from codi2.stores.base import Cursor, StoredBatch, TrailAdmin, TrailReader
from codi2.trail.chain import ZERO, ChainKey, expected_link
from codi2.trail.events import BatchHeader, EventQuery, encode_events, parse_time
from codi2.trail.replay import fold, read_disk

UNCHAINED_LISTED = 100  # events in no batch named one by one; the rest are counted
UNREADABLE_LISTED = 100  # entries of the disk that could not be read, named one by one; the rest are counted


class VerifyError(Exception):
    """The request cannot be answered as asked (one line for the user)."""


@dataclass
class Break:
    kind: str  # one of the kinds docs/trail-format.md lists
    batch: int | None  # where in the stream it is found; None for an event in no batch
    detail: str


@dataclass
class StreamReport:
    stream_id: str
    batches: int = 0  # stored
    checked: int = 0  # read back and hashed (all of them, without --since)
    events: int = 0
    first: str | None = None
    last: str | None = None
    head_batch: int = 0
    head_link: str | None = None
    pruned_through: int = 0  # the horizon: batches up to it were pruned (docs/retention.md)
    key_ids: list[str | None] = field(default_factory=list)
    breaks: list[Break] = field(default_factory=list)


@dataclass
class DiskReport:
    path: str
    root: str
    user_id: str | None
    entries: int
    differences: list[dict[str, Any]]
    unreadable: int = 0  # entries that could not be read (examined, listed or hashed): not compared
    unreadable_listed: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Report:
    tenant_id: str
    streams: list[StreamReport]
    trail_events: int
    unchained_events: int
    unchained: list[Break]
    disk: DiskReport | None = None

    @property
    def breaks(self) -> int:
        return sum(len(s.breaks) for s in self.streams) + self.unchained_events

    @property
    def ok(self) -> bool:
        return self.breaks == 0 and not (self.disk and self.disk.differences)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "breaks": self.breaks, **asdict(self)}


def verify(sink: TrailReader, tenant_id: str, keys: Sequence[ChainKey] = (), since: datetime | None = None) -> Report:
    """Check every stream of the tenant; `keys` are the HMAC keys the trail may be sealed with."""
    trail = {cursor for cursor, _ in sink.read(EventQuery(tenant_id, since=since))}
    chained: set[Cursor] = set()
    unread: dict[Cursor, tuple[StreamReport, int, Any]] = {}  # in a checked batch, not in the trail read
    keyring = {k.id: k for k in keys}
    streams = [
        _stream(sink, tenant_id, stream, keyring, since, chained, trail, unread) for stream in sink.streams(tenant_id)
    ]
    if unread:  # committed after the first scan, or hidden from reads: a second scan tells them apart
        now = {cursor for cursor, _ in sink.read(EventQuery(tenant_id, since=since))}
        unread = {cursor: where for cursor, where in unread.items() if cursor not in now}
        hidden: dict[tuple[int, int], tuple[StreamReport, int, list[Any]]] = {}  # per stream and batch
        for report, number, e in unread.values():
            hidden.setdefault((id(report), number), (report, number, []))[2].append(e)
        for report, number, events in hidden.values():
            e = events[0]
            detail = (
                f"{len(events)} of its events not in the tenant's trail as it is read (the store's index of them was"
                f" altered), e.g. event {e.id} ({e.action} {e.path!r} at {e.ts})"
            )
            report.breaks.append(Break("event_removed", number, detail))
    unchained = trail - chained
    listed: list[Break] = []
    if unchained:
        for cursor, e in sink.read(EventQuery(tenant_id, since=since)):
            if cursor in unchained and len(listed) < UNCHAINED_LISTED:
                detail = f"event {e.id} ({e.action} {e.path!r} at {e.ts}, user {e.user_id}) is in no batch"
                listed.append(Break("unchained_event", None, detail))
    return Report(tenant_id, streams, len(trail), len(unchained), listed)


def _stream(
    sink: TrailReader,
    tenant_id: str,
    stream_id: str,
    keyring: dict[str, ChainKey],
    since: datetime | None,
    chained: set[Cursor],
    trail: set[Cursor],
    unread: dict[Cursor, tuple[StreamReport, int, Any]],
) -> StreamReport:
    report = StreamReport(stream_id)
    stored, start_link = _after_horizon(sink, tenant_id, report, list(sink.batches(tenant_id, stream_id)))
    report.batches = len(stored)
    if stored:
        report.head_batch, report.head_link = stored[-1].header.number, stored[-1].header.link.hex()
    index = {start_link: -1} | {b.header.link: i for i, b in enumerate(stored)}  # what the first batch follows
    followed = {b.header.prev for b in stored}
    start = next((i for i, b in enumerate(stored) if since is None or parse_time(b.header.ts) >= since), len(stored))
    unchecked: dict[str | None, list[int]] = {}  # batches by the key id no given key has (None: unkeyed)
    last_cursor: dict[int, Any] = {}  # by index in `stored`: where the batch's events end in commit order
    for i, batch in enumerate(stored):
        report.breaks += _structure(stored, i, index, followed)
        if i < start:
            continue
        rows = sink.batch_events(tenant_id, batch)
        chained.update(cursor for cursor, _ in rows)
        content = _content(batch.header, rows, keyring, unchecked, report)
        report.breaks += content
        for cursor, e in [] if content else rows:  # each event of an intact batch must be in the trail read
            if cursor not in trail and (since is None or parse_time(e.ts) >= since):
                unread[cursor] = (report, batch.header.number, e)
        cursors: list[Any] = [cursor for cursor, _ in rows]
        follows = index.get(batch.header.prev, -1)
        if cursors and follows in last_cursor and min(cursors) < last_cursor[follows]:
            before = stored[follows].header.number
            detail = f"its events were committed before those of batch {before}, which it follows"
            report.breaks.append(Break("reordered", batch.header.number, detail))
        if cursors:
            last_cursor[i] = max(cursors)
    for key_id, numbers in unchecked.items():
        what = _span(numbers[0], numbers[-1]) + (f" ({len(numbers)} batches)" if len(numbers) > 1 else "")
        if key_id is None:
            detail = f"{what} with a plain SHA-256 link, though the trail is checked with keys"
            report.breaks.append(Break("unkeyed", numbers[0], detail))
        else:
            detail = f"{what} sealed with key {key_id}: give its --key-file to check them"
            report.breaks.append(Break("unknown_key", numbers[0], detail))
    return report


def _after_horizon(
    sink: TrailReader, tenant_id: str, report: StreamReport, stored: list[StoredBatch]
) -> tuple[list[StoredBatch], bytes]:
    """A pruned stream's live batches and the link its first must follow: its horizon's, as batch 1 follows
    ZERO. So a prune shows, and cannot hide a deletion: a batch after the horizon gone is still missing.
    Batches at or below the horizon are what an interrupted prune has not cleared yet."""
    horizon = sink.horizons(tenant_id).get(report.stream_id) if isinstance(sink, TrailAdmin) else None
    if horizon is None:
        return stored, ZERO
    report.pruned_through = horizon.number
    return [b for b in stored if b.header.number > horizon.number], horizon.link


def _structure(stored: list[StoredBatch], i: int, index: dict[bytes, int], followed: set[bytes]) -> Iterator[Break]:
    """What the headers alone say about batch `i`: whom it follows, and whether anyone follows it."""
    h = stored[i].header
    follows = index.get(h.prev)
    if follows is not None and follows > i:
        after = stored[follows].header.number
        yield Break("reordered", h.number, f"it follows batch {after}, which is stored after it")
    elif follows is None and i == 0:
        detail = f"batch {h.number} follows a link no stored batch has: the batches before it are not in the store"
        yield Break("starts_mid_chain", h.number, detail)
    elif follows is None:
        p = stored[i - 1].header.number
        gone = _span(p + 1, h.number - 1) if h.number > p + 1 else "the batch it follows"
        yield Break("missing_batch", h.number, f"{gone}: not in the store (it follows link {h.prev.hex()[:16]}…)")
    if follows is not None and follows < i and i + 1 < len(stored) and h.link not in followed:
        skipped_to = index.get(stored[i + 1].header.prev)
        if skipped_to is not None and skipped_to < i:
            what = _span(stored[skipped_to + 1].header.number, h.number)
            detail = f"no batch follows it: batch {stored[i + 1].header.number} skips {what}, inserted afterwards"
            yield Break("inserted_batch", h.number, detail)


def _span(first: int, last: int) -> str:
    return f"batch {first}" if first == last else f"batches {first} to {last}"


def _content(
    h: BatchHeader,
    rows: list[tuple[Cursor, Any]],
    keyring: dict[str, ChainKey],
    unchecked: dict[str | None, list[int]],
    report: StreamReport,
) -> list[Break]:
    """Count and hash the events stored for one batch."""
    events = [e for _, e in rows]
    report.checked += 1
    report.events += len(events)
    if h.key_id not in report.key_ids:
        report.key_ids.append(h.key_id)
    if events:
        times = sorted(e.ts for e in events)
        report.first = min(report.first or times[0], times[0])
        report.last = max(report.last or times[-1], times[-1])
    if len(events) < h.events:
        return [Break("event_removed", h.number, f"{h.events - len(events)} of its {h.events} events not in the store")]
    if len(events) > h.events:
        return [Break("event_inserted", h.number, f"{len(events) - h.events} events more than the {h.events} sealed")]
    records = encode_events(events)
    if h.key_id is None:
        if not hmac.compare_digest(expected_link(h, records, None), h.link):
            return [Break("altered", h.number, "its events or header are not what its link was computed over")]
        if keyring:
            unchecked.setdefault(None, []).append(h.number)
        return []
    key = keyring.get(h.key_id)
    if key is None:
        unchecked.setdefault(h.key_id, []).append(h.number)
    elif not hmac.compare_digest(expected_link(h, records, key), h.link):
        detail = f"its link does not verify with key {h.key_id}: altered, or forged without the key"
        return [Break("bad_link", h.number, detail)]
    return []


def compare_disk(sink: TrailReader, settings: Settings, path: Path) -> DiskReport:
    """Fold the user's whole trail (whatever `since` says) and compare it with the workspace at `path`:
    under the watch root of that path, or the trail's only root when the workspace was copied elsewhere.
    The disk is read as the daemon reads it (`codi2.disk.walk`), with its ignore rules, its own places
    left out and its hashing limit; what cannot be read is reported and not compared."""
    tenant_id, user_id = settings.tenant_id or "", settings.user_id
    users: set[str] = set()

    def events() -> Iterator[Any]:
        for _, e in sink.read(EventQuery(tenant_id)):
            users.add(e.user_id)
            if user_id is None or e.user_id == user_id:
                yield e

    state = fold(events())
    if user_id is None and len(users) > 1:
        raise VerifyError(f"the trail holds the events of {len(users)} users: name one with --user-id")
    path = path.absolute()
    roots = sorted({root for root, _ in state})
    if str(path) in roots or not roots:
        root = str(path)
    elif len(roots) == 1:
        root = roots[0]
    else:
        raise VerifyError(f"--disk {path} is none of the trail's watch roots ({', '.join(roots)})")
    if not path.is_dir():
        raise VerifyError(f"--disk {path}: not a directory")
    private, private_files = (
        _at(path, Path(root), places) for places in (settings.private_paths(), settings.private_files())
    )
    rules = IgnoreRules(settings.monitoring.ignore_patterns, [path], private)
    rules.add_private_files(private_files)
    try:
        disk = read_disk(path, rules, settings.monitoring.hash_max_bytes, root)
    except OSError as exc:
        raise VerifyError(f"--disk {path}: {exc.strerror or exc}") from None
    unseen = {p for p in disk.unknown if (root, p) not in disk.state}
    unlisted = {p for p in disk.unknown if p not in unseen and disk.state[(root, p)].type == "dir"}
    trail = {p: entry for (r, p), entry in state.items() if r == root and not _unseen(p, unseen, unlisted)}
    have = {p: entry for (_, p), entry in disk.state.items()}
    differences = []
    for p in sorted(trail.keys() | have.keys()):
        want, got = trail.get(p), have.get(p)
        if (want and got and want.matches(got)) or (want and got and p in disk.unknown and want.type == got.type):
            continue  # a file whose contents could not be read is compared by type
        kind = "not_on_disk" if got is None else "not_in_trail" if want is None else "differs"
        differences.append({"kind": kind, "path": p, "trail": want and asdict(want), "disk": got and asdict(got)})
    unreadable = [{"path": p, "problem": why} for p, why in sorted(disk.unknown.items())[:UNREADABLE_LISTED]]
    return DiskReport(str(path), root, user_id, len(have), differences, len(disk.unknown), unreadable)


def _at(path: Path, root: Path, places: list[Path]) -> list[Path]:
    """`places` below the watch root `root` at the same place below `path`, a copy of the workspace."""
    return [path / p.relative_to(root) for p in places if p.is_relative_to(root)]


def _unseen(rel: str, unseen: set[str], unlisted: set[str]) -> bool:
    """Whether nothing is known of `rel` on disk: it is, or is below, an entry that could not be examined,
    or it is below a directory that could not be listed."""
    if rel in unseen:
        return True
    parent = rel.rpartition("/")[0]
    while parent:
        if parent in unseen or parent in unlisted:
            return True
        parent = parent.rpartition("/")[0]
    return False


def render(report: Report) -> str:
    """The report for a terminal: per stream its figures and breaks, then events in no batch, the disk."""
    lines = []
    for s in report.streams:
        keys = ", ".join(k or "none (SHA-256)" for k in s.key_ids) or "-"
        lines.append(f"stream {s.stream_id}")
        checked = "" if s.checked == s.batches else f" ({s.checked} checked)"
        lines.append(f"  batches {s.batches}{checked}, events {s.events}, {s.first or '-'} … {s.last or '-'}")
        lines.append(f"  head: batch {s.head_batch}, link {s.head_link or '-'}; keys: {keys}")
        if s.pruned_through:
            lines.append(f"  pruned through batch {s.pruned_through} (its first live batch follows it)")
        lines += [f"  BREAK {b.kind} at batch {b.batch}: {b.detail}" for b in s.breaks]
    if report.unchained_events:
        lines.append(f"{report.unchained_events} events in no batch")
        lines += [f"  BREAK {b.kind}: {b.detail}" for b in report.unchained]
        if report.unchained_events > len(report.unchained):
            lines.append(f"  … and {report.unchained_events - len(report.unchained)} more")
    if report.disk is not None:
        d = report.disk
        verdict = "the trail differs" if d.differences else "the trail folds to exactly what is there"
        if d.unreadable:
            verdict += f" ({d.unreadable} entries could not be read, and are not compared)"
        lines.append(f"disk {d.path} (watch root {d.root}, user {d.user_id or '-'}): {d.entries} entries; {verdict}")
        lines += [f"  {x['kind']}: {x['path']!r} (trail {x['trail']}, disk {x['disk']})" for x in d.differences]
        lines += [f"  unreadable: {x['path']!r}: {x['problem']}" for x in d.unreadable_listed]
        if d.unreadable > len(d.unreadable_listed):
            lines.append(f"  … and {d.unreadable - len(d.unreadable_listed)} more unreadable")
    events = sum(s.events for s in report.streams)
    summary = f"streams {len(report.streams)}, batches {sum(s.checked for s in report.streams)}, events {events}"
    verdict = "intact" if report.breaks == 0 else f"{report.breaks} breaks"
    lines.append(f"tenant {report.tenant_id}: {verdict} ({summary})")
    return "\n".join(lines)
