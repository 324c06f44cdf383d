"""The configured backend opened: above both backends, so neither the protocols in `base` nor a backend
imports the other (`base` no longer reaches up to the modules that implement it)."""

from __future__ import annotations

from codi2.config import Settings
from codi2.stores.base import Sink


def open_sink(settings: Settings, *, create: bool = True) -> Sink:
    """Open the configured backend. `create=False` is for readers: a missing store is an error."""
    if settings.backend == "sqlite":
        from codi2.stores.sqlite import SqliteSink

        return SqliteSink(settings.sqlite_file, create=create)
    from codi2.stores.fdb.sink import open_fdb_sink

    return open_fdb_sink(settings, writer=create)
