"""The durable spool on real files: recovery, acknowledgement, segment deletion, torn tails, disk full."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from sink_contract import make_event

from codi2.spool import ACK_FILE, DiskSpool, SpoolFullError


def _spool(path: Path, **kw) -> DiskSpool:
    return DiskSpool(path, max_bytes=kw.pop("max_bytes", 1 << 30), segment_bytes=kw.pop("segment_bytes", 1 << 20), **kw)


def _segments(path: Path) -> set[str]:
    return {p.name for p in path.glob("*.seg")}


def _fill(spool: DiskSpool, batches: int, per: int = 3) -> list:
    spool.recover()
    items = []
    for b in range(batches):
        events = [make_event(f"b{b}/f{i}") for i in range(per)]
        items.append(spool.append(events, [(i, 10**9 + i) for i in range(per)]))
    return items


def test_unacknowledged_batches_survive_a_restart_with_their_ids(tmp_path: Path) -> None:
    items = _fill(_spool(tmp_path), 5)
    again = _spool(tmp_path)
    recovered = again.recover()
    assert [r.batch for r in recovered] == [i.batch for i in items]
    assert [r.facts for r in recovered] == [i.facts for i in items]
    assert again.pending_events == 15 and again.corrupt_records == 0


async def test_acknowledged_batches_are_not_replayed_and_segments_go(tmp_path: Path) -> None:
    spool = _spool(tmp_path, segment_bytes=4096)
    items = _fill(spool, 40)
    for item in items:
        await spool.publish(item)
    assert len(_segments(tmp_path)) > 3
    for item in items[:30]:
        assert await spool.peek() is item
        await spool.ack(item)
    spool.shutdown()
    remaining = {i.segment for i in items[30:]}
    assert _segments(tmp_path) == remaining
    again = _spool(tmp_path)
    assert [r.batch.batch_id for r in again.recover()] == [i.batch.batch_id for i in items[30:]]


def test_torn_tail_is_cut_and_counted(tmp_path: Path) -> None:
    items = _fill(_spool(tmp_path), 3)
    segment = tmp_path / items[-1].segment
    with open(segment, "r+b") as f:
        f.truncate(items[-1].offset + 20)  # the crash came in the middle of the last record
    again = _spool(tmp_path)
    assert [r.batch for r in again.recover()] == [i.batch for i in items[:2]]
    assert again.corrupt_records == 1
    assert segment.stat().st_size == items[-1].offset
    third = _spool(tmp_path)
    third.recover()
    assert third.corrupt_records == 0  # cut once, clean afterwards


def test_flipped_bit_is_caught_by_the_checksum(tmp_path: Path) -> None:
    items = _fill(_spool(tmp_path), 2)
    segment = tmp_path / items[-1].segment
    data = bytearray(segment.read_bytes())
    data[items[-1].offset + 40] ^= 0x01
    segment.write_bytes(bytes(data))
    again = _spool(tmp_path)
    assert [r.batch for r in again.recover()] == [items[0].batch]
    assert again.corrupt_records == 1


def test_segments_sort_in_creation_order_within_one_millisecond(tmp_path: Path) -> None:
    spool = _spool(tmp_path, segment_bytes=1)  # every batch opens a new segment
    items = _fill(spool, 20, per=1)
    assert [i.segment for i in items] == sorted(i.segment for i in items)
    assert [i.batch.batch_id for i in items] == sorted(i.batch.batch_id for i in items)


def test_write_failure_raises_and_leaves_no_torn_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = _spool(tmp_path)
    good = _fill(spool, 1)
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SpoolFullError):
        spool.append([make_event("lost")], [(1, 1)])
    monkeypatch.setattr(os, "write", real_write)
    after = spool.append([make_event("after")], [(2, 2)])
    again = _spool(tmp_path)
    assert [r.batch for r in again.recover()] == [good[0].batch, after.batch]
    assert again.corrupt_records == 0


async def test_full_spool_blocks_the_batcher_until_acks_free_room(tmp_path: Path) -> None:
    spool = _spool(tmp_path, max_bytes=3000)
    items = _fill(spool, 4)
    for item in items[:2]:
        await spool.wait_for_room(item.size)
        await spool.publish(item)
    assert items[0].size + items[1].size < 3000
    waiter = asyncio.create_task(spool.wait_for_room(3000 - items[1].size))  # fits once items[0] is acked
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await spool.ack(items[0])
    await asyncio.wait_for(waiter, 5)
    assert (tmp_path / ACK_FILE).exists()
