"""`[retention] max_age` applied by the daemon itself, with SQLite only: at start and then daily, on the
journal thread (the store's file has it as its one writer). With FoundationDB a pod never deletes trail
data: the retention CronJob does (docs/retention.md)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from codi2.pipeline.pipeline import Pipeline

log = structlog.get_logger("codi2.daemon.retention")

EVERY_S = 86_400.0


def prune_once(path: Path, tenant_id: str, max_age_s: int) -> None:
    """Journal thread: prune what is older than `max_age_s`; a failure is logged and tried again next time."""
    from codi2.stores.sqlite import prune_file

    try:
        before = datetime.fromtimestamp(time.time() - max_age_s, UTC)  # a cutoff before year 1 fails here
        plan = prune_file(path, tenant_id, before)
    except Exception as exc:
        log.warning("retention_failed", error=str(exc), note="tried again in a day")
        return
    pruned = {stream: p.horizon.number for stream, p in plan.streams.items()}
    log.info(
        "retention_pruned",
        before=before.isoformat(),
        streams=pruned,
        events=sum(p.events for p in plan.streams.values()),
    )


async def apply_daily(pipeline: Pipeline, path: Path, tenant_id: str, max_age_s: int) -> None:
    while True:
        pipeline.post(lambda: prune_once(path, tenant_id, max_age_s))
        await asyncio.sleep(EVERY_S)
