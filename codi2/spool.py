"""The stage between batcher and sink. Here: a bounded in-memory queue of batches.

It is the seam where the durable on-disk spool goes: `put` blocks when full (back-pressure up to the
watcher), `peek` hands the oldest batch to the shipper, `ack` drops it once the store committed it.
"""

from __future__ import annotations

import asyncio
from collections import deque

from codi2.events import Batch


class MemorySpool:
    def __init__(self, max_batches: int) -> None:
        self._batches: deque[Batch] = deque()
        self._max = max_batches
        self._changed = asyncio.Condition()
        self._closed = False

    @property
    def pending_events(self) -> int:
        return sum(len(b.events) for b in self._batches)

    async def put(self, batch: Batch) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._batches) < self._max)
            self._batches.append(batch)
            self._changed.notify_all()

    async def peek(self) -> Batch | None:
        """The oldest unacknowledged batch; None once closed and empty."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._batches or self._closed)
            return self._batches[0] if self._batches else None

    async def ack(self, batch: Batch) -> None:
        async with self._changed:
            if self._batches and self._batches[0] is batch:
                self._batches.popleft()
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()
