"""A fault-injecting double of the slice of FoundationDB's transaction API the sink uses.

Sorted key space, versionstamps filled in at commit from a global version, read-your-writes for plain
sets, FoundationDB's size limits, and `on_error` that retries exactly the codes FoundationDB retries.
Faults are injected per kind of call and consumed in order. Test-only: never imported by the package.
"""

from __future__ import annotations

import struct
import sys
import types
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import fdb
from sortedcontainers import SortedDict

from codi2.sinks.fdb import FDB_ERRORS

# `fdb.tuple.Versionstamp.to_bytes` checks `isinstance(tr_version, fdb.impl.Value)`, and importing
# `fdb.impl` loads libfdb_c, which cannot be installed here. An incomplete versionstamp is never such a
# Value, so a stand-in class gives the official encoder exactly the answer the real one would.
if "fdb.impl" not in sys.modules:
    fdb.impl = types.SimpleNamespace(Value=type("Value", (), {}))  # type: ignore[attr-defined]

RETRYABLE = frozenset({1007, 1009, 1020, 1021, 1037, 1038, 1042, 1051, 1078, 1213})
MAX_KEY = 10_000
MAX_VALUE = 100_000


class FakeFDBError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
        self.description = FDB_ERRORS.get(code, "unknown_error")

    def __str__(self) -> str:
        return f"{self.description} ({self.code})"


class FakeFuture:
    def __init__(self, value: Any = None, error: Exception | None = None) -> None:
        self._value = value
        self._error = error

    def wait(self) -> FakeFuture:
        if self._error is not None:
            raise self._error
        return self

    @property
    def value(self) -> Any:
        self.wait()
        return self._value

    def present(self) -> bool:
        return self.value is not None


@dataclass
class KeyValue:
    key: bytes
    value: bytes


@dataclass
class FakeDatabase:
    """`faults` maps a point ("read", "commit_before", "commit_after") to error codes raised in turn."""

    data: SortedDict = field(default_factory=SortedDict)
    version: int = 1_000_000
    max_transaction_bytes: int = 10_000_000
    faults: dict[str, deque[int]] = field(default_factory=dict)
    commits: int = 0
    attempts: int = 0

    def inject(self, point: str, *codes: int) -> None:
        self.faults.setdefault(point, deque()).extend(codes)

    def take_fault(self, point: str) -> FakeFDBError | None:
        queue = self.faults.get(point)
        return FakeFDBError(queue.popleft()) if queue else None

    def create_transaction(self) -> FakeTransaction:
        return FakeTransaction(self)


class _Options:
    def __init__(self) -> None:
        self.timeout_ms: int | None = None
        self.retry_limit: int | None = None

    def set_timeout(self, ms: int) -> None:
        self.timeout_ms = ms

    def set_retry_limit(self, n: int) -> None:
        self.retry_limit = n


def _fill_versionstamp(data: bytes, stamp: bytes) -> bytes:
    """API >= 520: the last 4 bytes are the little-endian offset of the 10-byte incomplete stamp."""
    (offset,) = struct.unpack("<L", data[-4:])
    body = data[:-4]
    return body[:offset] + stamp + body[offset + 10 :]


class FakeTransaction:
    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self.options = _Options()
        self.retries = 0
        self._reset()

    def _reset(self) -> None:
        self._mutations: list[tuple[str, bytes, bytes | None]] = []
        self._local: dict[bytes, bytes | None] = {}

    # Reads -----------------------------------------------------------------------------------------

    def get(self, key: bytes) -> FakeFuture:
        fault = self.db.take_fault("read")
        if fault is not None:
            return FakeFuture(error=fault)
        if key in self._local:
            return FakeFuture(self._local[key])
        return FakeFuture(self.db.data.get(key))

    def get_range(self, begin: bytes, end: bytes, limit: int = 0) -> list[KeyValue]:
        fault = self.db.take_fault("read")
        if fault is not None:
            raise fault
        merged = {k: self.db.data[k] for k in self.db.data.irange(begin, end, inclusive=(True, False))}
        for k, v in self._local.items():
            if begin <= k < end:
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
        rows = [KeyValue(k, merged[k]) for k in sorted(merged)]
        return rows[:limit] if limit else rows

    def get_read_version(self) -> FakeFuture:
        fault = self.db.take_fault("read")
        return FakeFuture(error=fault) if fault else FakeFuture(self.db.version)

    # Writes ----------------------------------------------------------------------------------------

    def set(self, key: bytes, value: bytes) -> None:
        self._mutations.append(("set", key, value))
        self._local[key] = value

    def clear(self, key: bytes) -> None:
        self._mutations.append(("clear", key, None))
        self._local[key] = None

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._mutations.append(("clear_range", begin, end))
        for k in [k for k in self._local if begin <= k < end]:
            self._local[k] = None

    def set_versionstamped_key(self, key: bytes, value: bytes) -> None:
        self._mutations.append(("vs_key", key, value))

    def set_versionstamped_value(self, key: bytes, value: bytes) -> None:
        self._mutations.append(("vs_value", key, value))

    # Commit and retry ------------------------------------------------------------------------------

    def commit(self) -> FakeFuture:
        db = self.db
        db.attempts += 1
        fault = db.take_fault("commit_before")
        if fault is not None:
            return FakeFuture(error=fault)
        size = 0
        for _, key, value in self._mutations:
            if len(key) > MAX_KEY + 4:
                return FakeFuture(error=FakeFDBError(2102))
            if value is not None and len(value) > MAX_VALUE + 4:
                return FakeFuture(error=FakeFDBError(2103))
            size += len(key) + len(value or b"")
        if size > db.max_transaction_bytes:
            return FakeFuture(error=FakeFDBError(2101))
        db.version += 1
        stamp = struct.pack(">QH", db.version, 0)
        for op, key, value in self._mutations:
            if op == "set":
                db.data[key] = value
            elif op == "clear":
                db.data.pop(key, None)
            elif op == "clear_range":
                for k in list(db.data.irange(key, value, inclusive=(True, False))):
                    del db.data[k]
            elif op == "vs_key":
                db.data[_fill_versionstamp(key, stamp)] = value
            else:
                db.data[key] = _fill_versionstamp(value, stamp)
        db.commits += 1
        fault = db.take_fault("commit_after")  # e.g. 1021: committed, but the client is not told
        return FakeFuture(error=fault) if fault else FakeFuture()

    def on_error(self, error: Exception) -> FakeFuture:
        code = getattr(error, "code", None)
        limit = self.options.retry_limit
        if code in RETRYABLE and (limit is None or self.retries < limit):
            self.retries += 1
            self._reset()
            return FakeFuture()
        return FakeFuture(error=error)
