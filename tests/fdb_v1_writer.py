"""Layout v1 as codi2 0.2 wrote it (docs/fdb-layout.md, "v1 (read only)"), kept for the tests only: the store a
deployment has when it upgrades, written key for key, so that reading, verifying and continuing it is tested
against the real thing and not against what the new reader expects. One transaction per batch (a batch over
1 MB was cut into parts by 0.2; the reader handles runs of several commits the same way)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import fdb
import fdb.tuple as fdbtuple

from codi2.stores.fdb.codec import Keys
from codi2.trail.events import Batch, Event


def v1_value(event: Event) -> bytes:
    """An `audit` value: a tuple, tenant left out (it is in the key), paths as their raw bytes."""
    fields = (1, event.id, event.seq, event.ts, event.user_id, event.session_id, event.pod, event.action)
    paths = (os.fsencode(event.path), None if event.dest_path is None else os.fsencode(event.dest_path))
    rest = (event.root, event.type, event.size, event.mode, event.mtime, event.sha256, event.origin)
    return bytes(fdbtuple.pack((*fields, *paths, *rest)))


class V1Writer:
    def __init__(self, db: Any, root: tuple[str, ...] = ("codi2",)) -> None:
        self.db = db
        self.keys = Keys(root)

    def write_batch(self, batch: Batch) -> None:
        tr = self.db.create_transaction()
        while True:
            try:
                self._write(tr, batch)
                tr.commit().wait()
                return
            except fdb.FDBError as exc:
                tr.on_error(exc).wait()

    def _write(self, tr: Any, batch: Batch) -> None:
        keys, vs = self.keys, fdbtuple.Versionstamp()
        tenant = batch.events[0].tenant_id
        seen = [tr.get(keys.key(tenant, "event_ids", e.id)) for e in batch.events]
        n = 0
        for event, stored in zip(batch.events, seen, strict=True):
            if stored.value is not None:
                continue
            raw = os.fsencode(event.path)
            path_key: Any = raw if len(raw) <= 2048 else ("sha256", hashlib.sha256(raw).hexdigest())
            tr.set_versionstamped_key(keys.key(tenant, "audit", vs, n), v1_value(event))
            tr.set_versionstamped_key(keys.key(tenant, "audit_by_path", path_key, vs, n), event.id.encode())
            tr.set_versionstamped_value(
                keys.key(tenant, "event_ids", event.id), bytes(fdbtuple.pack_with_versionstamp((vs, n)))
            )
            n += 1
        h = batch.header
        if h is not None:
            value = (1, fdbtuple.Versionstamp(), h.ts, h.prev, h.link, h.key_id, h.events, ((None, 0, n),))
            tr.set_versionstamped_value(
                keys.key(tenant, "chain", h.stream_id, h.number), bytes(fdbtuple.pack_with_versionstamp(value))
            )
