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

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from codi2.config import Settings
from codi2.disk.ignore import IgnoreRules
from codi2.stores.base import Cursor, Horizon, StoredBatch, TrailAdmin, TrailReader
from codi2.trail.chain import ZERO, ChainKey, expected_link
from codi2.trail.coverage import Coverage, Range
from codi2.trail.events import BatchHeader, EventQuery, encode_events, parse_time
from codi2.trail.replay import fold, read_disk

UNCHAINED_LISTED = 100  # events in no batch named one by one; the rest are counted
DIGEST_MODULUS = 1 << 256
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
    coverage: list[Range] = field(default_factory=list)  # when a daemon was watching (`codi2.trail.coverage`)


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
    """Check every stream of the tenant; `keys` are the HMAC keys the trail may be sealed with.

    Memory is per stream, not per event: the trail read and the checked batches' events are each summed into
    a `_Digest`, and only when the two differ (an event in no batch, one hidden from reads, or a batch
    committed while verifying) are both walked again with their cursors kept, to name what differs."""
    keyring = {k.id: k for k in keys}
    horizons = sink.horizons(tenant_id) if isinstance(sink, TrailAdmin) else {}
    read = _Digest()
    for cursor, _ in sink.read(EventQuery(tenant_id, since=since)):
        read.add(cursor)
    checked = _Digest()
    streams = [_stream(sink, tenant_id, s, horizons.get(s), keyring, since, checked) for s in sink.streams(tenant_id)]
    streams += _missing_streams(sink, tenant_id, streams, horizons)
    if read == checked:
        return Report(tenant_id, streams, read.count, 0, [])
    trail = {cursor for cursor, _ in sink.read(EventQuery(tenant_id, since=since))}
    exact = _Exact(trail)
    for report in streams:
        if report.batches:
            stream_id = report.stream_id
            _stream(sink, tenant_id, stream_id, horizons.get(stream_id), keyring, since, _Digest(), exact)
    unread = exact.unread
    if unread:  # committed after the first scan, or hidden from reads: a second scan tells them apart
        now = {cursor for cursor, _ in sink.read(EventQuery(tenant_id, since=since))}
        unread = {cursor: where for cursor, where in unread.items() if cursor not in now}
        hidden: dict[tuple[str, int], tuple[StreamReport, int, list[Any]]] = {}  # per stream and batch
        by_id = {report.stream_id: report for report in streams}
        for stream_id, number, e in unread.values():
            hidden.setdefault((stream_id, number), (by_id[stream_id], number, []))[2].append(e)
        for report, number, events in hidden.values():
            e = events[0]
            detail = (
                f"{len(events)} of its events not in the tenant's trail as it is read (the store's index of them was"
                f" altered), e.g. event {e.id} ({e.action} {e.path!r} at {e.ts})"
            )
            report.breaks.append(Break("event_removed", number, detail))
    unchained = trail - exact.chained
    listed: list[Break] = []
    if unchained:
        for cursor, e in sink.read(EventQuery(tenant_id, since=since)):
            if cursor in unchained and len(listed) < UNCHAINED_LISTED:
                detail = f"event {e.id} ({e.action} {e.path!r} at {e.ts}, user {e.user_id}) is in no batch"
                listed.append(Break("unchained_event", None, detail))
    return Report(tenant_id, streams, len(trail), len(unchained), listed)


@dataclass
class _Digest:
    """A set of cursors as a count and a sum of their SHA-256 (modulo 2**256): two equal digests are two equal
    sets, but for a collision nobody can aim at without choosing the store's own positions and versionstamps."""

    count: int = 0
    total: int = 0

    def add(self, cursor: Cursor) -> None:
        raw = cursor if isinstance(cursor, bytes) else str(cursor).encode()
        self.count += 1
        self.total = (self.total + int.from_bytes(hashlib.sha256(raw).digest())) % DIGEST_MODULUS


@dataclass
class _Exact:
    """The second walk, when the digests differ: every cursor kept, to name the events in no batch and those
    of a checked batch that the trail read does not give."""

    trail: set[Cursor]
    chained: set[Cursor] = field(default_factory=set)
    unread: dict[Cursor, tuple[str, int, Any]] = field(default_factory=dict)


class _Headers:
    """A stream's live headers looked up by link, walking the stream again: only when a batch does not follow
    the one stored before it (a break), so a stream that is intact is walked once and nothing of it is kept."""

    def __init__(self, sink: TrailReader, tenant_id: str, stream_id: str, horizon: Horizon | None) -> None:
        self._sink, self._tenant, self._stream, self._horizon = sink, tenant_id, stream_id, horizon

    def live(self) -> Iterator[StoredBatch]:
        return _after_horizon(self._sink.batches(self._tenant, self._stream), self._horizon)

    def _walk(self) -> Iterator[tuple[int, StoredBatch]]:
        return enumerate(self.live())

    def position(self, link: bytes) -> int | None:
        """Where the live batch with this link is (the last one, if forged twice); -1 for what the first live
        batch follows (ZERO, or the horizon's link)."""
        found = -1 if link == _start_link(self._horizon) else None
        for i, batch in self._walk():
            if batch.header.link == link:
                found = i
        return found

    def followed(self, link: bytes) -> bool:
        return any(batch.header.prev == link for _, batch in self._walk())

    def at(self, position: int) -> StoredBatch:
        return next(batch for i, batch in self._walk() if i == position)

    def checked(self, position: int, since: datetime | None) -> bool:
        """Whether the batch at `position` is at or after the first journaled at or after `since`."""
        first = next((i for i, b in self._walk() if since is None or parse_time(b.header.ts) >= since), None)
        return first is not None and first <= position

    def end(self, batch: StoredBatch) -> Any:
        """Where a batch's events end in commit order (None: it has none)."""
        return max((cursor for cursor, _ in self._sink.batch_events(self._tenant, batch)), default=None)


def _with_next(batches: Iterator[StoredBatch]) -> Iterator[tuple[int, StoredBatch, StoredBatch | None]]:
    """Each batch with its position and the batch stored after it."""
    current = next(batches, None)
    i = 0
    while current is not None:
        following = next(batches, None)
        yield i, current, following
        current, i = following, i + 1


def _stream(
    sink: TrailReader,
    tenant_id: str,
    stream_id: str,
    horizon: Horizon | None,
    keyring: dict[str, ChainKey],
    since: datetime | None,
    checked: _Digest,
    exact: _Exact | None = None,
) -> StreamReport:
    """Walk one stream's live batches (after its horizon, if pruned) in batch order, keeping the batch before
    and the one after: its structure from the headers, and the content of every batch from the first
    journaled at or after `since` on."""
    report = StreamReport(stream_id)
    report.pruned_through = horizon.number if horizon is not None else 0
    headers = _Headers(sink, tenant_id, stream_id, horizon)
    unchecked: dict[str | None, list[int]] = {}  # batches by the key id no given key has (None: unkeyed)
    prev: StoredBatch | None = None
    prev_end: Any = None  # where the batch before ends in commit order, when it was read and held events
    started = False
    coverage = Coverage()
    for i, batch, following in _with_next(headers.live()):
        h = batch.header
        report.batches += 1
        report.head_batch, report.head_link = h.number, h.link.hex()
        follows = i - 1 if _follows(h, prev, horizon) else headers.position(h.prev)
        report.breaks += _structure(i, h, follows, prev, following, headers)
        before, before_end = prev, prev_end
        prev, prev_end = batch, None
        started = started or since is None or parse_time(h.ts) >= since
        if not started:
            continue
        rows = sink.batch_events(tenant_id, batch)
        for cursor, e in rows:
            coverage.feed(e)
            if since is None or parse_time(e.ts) >= since:
                checked.add(cursor)
        content = _content(h, rows, keyring, unchecked, report)
        report.breaks += content
        if exact is not None:
            exact.chained.update(cursor for cursor, _ in rows)
            for cursor, e in [] if content else rows:  # each event of an intact batch must be in the trail read
                if cursor not in exact.trail and (since is None or parse_time(e.ts) >= since):
                    exact.unread[cursor] = (stream_id, h.number, e)
        if not rows:
            continue
        prev_end = max(cursor for cursor, _ in rows)
        if follows is not None and 0 <= follows < i - 1:  # it follows an earlier batch than the one before it
            before = headers.at(follows)
            before_end = headers.end(before) if headers.checked(follows, since) else None
        elif follows != i - 1:
            before = None
        if before is not None and before_end is not None and min(cursor for cursor, _ in rows) < before_end:
            detail = f"its events were committed before those of batch {before.header.number}, which it follows"
            report.breaks.append(Break("reordered", h.number, detail))
    for key_id, numbers in unchecked.items():
        what = _span(numbers[0], numbers[-1]) + (f" ({len(numbers)} batches)" if len(numbers) > 1 else "")
        if key_id is None:
            detail = f"{what} with a plain SHA-256 link, though the trail is checked with keys"
            report.breaks.append(Break("unkeyed", numbers[0], detail))
        else:
            detail = f"{what} sealed with key {key_id}: give its --key-file to check them"
            report.breaks.append(Break("unknown_key", numbers[0], detail))
    report.coverage = coverage.ranges()
    return report


def _after_horizon(batches: Iterator[StoredBatch], horizon: Horizon | None) -> Iterator[StoredBatch]:
    """A pruned stream's live batches: those after its horizon, the first of which must follow the horizon's
    link (`_starts_stream`). So a prune shows, and cannot hide a deletion: a batch after the horizon gone is
    still missing. Batches at or below the horizon are what an interrupted prune has not cleared yet."""
    through = horizon.number if horizon is not None else 0
    return (batch for batch in batches if batch.header.number > through)


def _follows(h: BatchHeader, prev: StoredBatch | None, horizon: Horizon | None) -> bool:
    """Whether a batch follows the live batch stored before it, or is its stream's start (the usual case)."""
    return _starts_stream(h, horizon) if prev is None else h.prev == prev.header.link


def _starts_stream(h: BatchHeader, horizon: Horizon | None) -> bool:
    """Whether a stream's first live batch is where its chain begins: batch 1, following no one, or, in a
    pruned stream, the batch after its horizon, following the last batch pruned."""
    return h.prev == _start_link(horizon)


def _start_link(horizon: Horizon | None) -> bytes:
    """What a stream's first live batch follows: ZERO, or its horizon's link."""
    return ZERO if horizon is None else horizon.link


def _structure(
    i: int,
    h: BatchHeader,
    follows: int | None,
    prev: StoredBatch | None,
    following: StoredBatch | None,
    headers: _Headers,
) -> list[Break]:
    """What the headers alone say about live batch `i`: whom it follows (`follows`, its position), and whether
    anyone follows it."""
    breaks = []
    if follows is not None and follows > i:
        after = headers.at(follows).header.number
        breaks.append(Break("reordered", h.number, f"it follows batch {after}, which is stored after it"))
    elif follows is None and prev is None:
        detail = f"batch {h.number} follows a link no stored batch has: the batches before it are not in the store"
        breaks.append(Break("starts_mid_chain", h.number, detail))
    elif follows is None and prev is not None:
        p = prev.header.number
        gone = _span(p + 1, h.number - 1) if h.number > p + 1 else "the batch it follows"
        detail = f"{gone}: not in the store (it follows link {h.prev.hex()[:16]}…)"
        breaks.append(Break("missing_batch", h.number, detail))
    if (
        follows is not None
        and follows < i
        and following is not None
        and following.header.prev != h.link
        and not headers.followed(h.link)
    ):
        skipped_to = headers.position(following.header.prev)
        if skipped_to is not None and skipped_to < i:
            what = _span(headers.at(skipped_to + 1).header.number, h.number)
            detail = f"no batch follows it: batch {following.header.number} skips {what}, inserted afterwards"
            breaks.append(Break("inserted_batch", h.number, detail))
    return breaks


def _missing_streams(
    sink: TrailReader, tenant_id: str, found: list[StreamReport], horizons: dict[str, Horizon]
) -> list[StreamReport]:
    """Streams the registry knows of that have no batches: registered with none stored, or named as the
    stream a later one succeeds and gone (or cut before the head it had then). A stream lost whole leaves no
    break in any chain; its successor's registry entry is what shows it. A prune is no loss: a stream's
    horizon holds its head as far as it was pruned."""
    heads = {stream_id: h.number for stream_id, h in horizons.items()}
    heads |= {report.stream_id: report.head_batch for report in found if report.batches}
    missing: dict[str, StreamReport] = {}

    def report_of(stream_id: str) -> StreamReport:
        return next((r for r in found if r.stream_id == stream_id), None) or missing.setdefault(
            stream_id, StreamReport(stream_id)
        )

    for entry in sink.registry(tenant_id):
        if entry.stream_id not in heads:
            detail = f"registered for user {entry.user_id} on {entry.pod} at {entry.first_ts}, with no batch stored"
            report_of(entry.stream_id).breaks.append(Break("missing_stream", None, detail))
        if entry.predecessor is None:
            continue
        stream_id, number, _ = entry.predecessor
        if heads.get(stream_id, 0) < number:
            had = f"ends at batch {heads[stream_id]}" if stream_id in heads else "is not in the store"
            detail = (
                f"stream {stream_id} {had}, but stream {entry.stream_id} (user {entry.user_id}, {entry.pod}), begun"
                f" at {entry.first_ts}, found its head at batch {number}"
            )
            report_of(stream_id).breaks.append(Break("missing_stream", number, detail))
    return list(missing.values())


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
    """The chain's report for a terminal: per stream its figures and breaks, then events in no batch (the disk's
    report, if any, is the CLI's to render)."""
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
        lines += [f"  watched {r.start} … {r.end} (from {r.began}, to {r.ended})" for r in s.coverage]
    if report.unchained_events:
        lines.append(f"{report.unchained_events} events in no batch")
        lines += [f"  BREAK {b.kind}: {b.detail}" for b in report.unchained]
        if report.unchained_events > len(report.unchained):
            lines.append(f"  … and {report.unchained_events - len(report.unchained)} more")
    events = sum(s.events for s in report.streams)
    summary = f"streams {len(report.streams)}, batches {sum(s.checked for s in report.streams)}, events {events}"
    verdict = "intact" if report.breaks == 0 else f"{report.breaks} breaks"
    lines.append(f"tenant {report.tenant_id}: {verdict} ({summary})")
    return "\n".join(lines)
