"""A journal that cannot be trusted: moved aside for a post-mortem, and what its outbox still holds that
checks out carried over into the new one (the caller, at start-up or on the journal thread, is then the
only user of either file)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from codi2.journal.outbox import COLUMNS, BadRecord, connect_readonly, decode
from codi2.trail.events import BatchHeader, Event


def move_aside(path: Path) -> Path:
    """Rename a corrupt journal (with its WAL) out of the way, keeping it for a post-mortem."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(aside) + suffix))
    return aside


def salvage_outbox(path: Path) -> tuple[list[tuple[str, list[Event], BatchHeader | None]], int]:
    """Batches still readable and intact in a corrupt journal, in order, with their chain headers, and how
    many rows were lost (-1 when the outbox could not be read at all)."""
    good: list[tuple[str, list[Event], BatchHeader | None]] = []
    lost = 0
    try:
        db = connect_readonly(path)
    except sqlite3.Error:
        return good, -1
    with contextlib.closing(db):
        try:
            numbers = [n for (n,) in db.execute("SELECT n FROM outbox ORDER BY n")]
        except sqlite3.Error:
            return good, -1
        for n in numbers:
            try:
                row = db.execute(f"SELECT {COLUMNS} FROM outbox WHERE n = ?", (n,)).fetchone()
                batch = decode(*row)
            except (sqlite3.Error, BadRecord, TypeError):
                lost += 1
                continue
            good.append((batch.batch_id, list(batch.events), batch.header))
    return good, lost
