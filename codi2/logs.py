"""structlog, configured once at start-up: JSON in production, console for people.

Standard-library loggers (watchdog, aiohttp) go through the same renderer, so every line of the pod's
log has one shape.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog


def _bound(context: Mapping[str, Any]) -> structlog.typing.Processor:
    """Adds the process's own context (who the daemon works for) to every line. Not contextvars: a
    thread starts with an empty context, and most of the daemon's lines come from its threads."""

    def add(logger: Any, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        for key, value in context.items():
            event.setdefault(key, value)
        return event

    return add


def configure_logging(level: str = "info", fmt: str = "json", context: Mapping[str, Any] | None = None) -> None:
    """Once at start-up; `context` (the daemon's tenant, user, pod, session) is on every line, from every
    thread and from standard-library loggers too."""
    shared: list[structlog.typing.Processor] = [
        _bound(dict(context or {})),
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if fmt == "json":
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # One line per probe would drown everything else.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
