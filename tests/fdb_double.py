"""Faults at exact points, for what the fake libfdb_c cannot show: it draws its faults at random per commit
from a list read once per process, and fails reads only in an outage.

`FaultyDatabase` wraps a real `fdb.Database` (the real bindings over the fake library) and raises a real
`fdb.FDBError` at a chosen read or commit: before the commit is sent, or after it landed (what a client sees
on `commit_unknown_result`). Everything else is the real bindings and the fake library, including
`on_error`'s decision to retry an injected error, its back-off and the retry limit.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class _Failed:
    """A future that resolves to an error, as the bindings' futures do when a read fails."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def wait(self) -> Any:
        raise self._error

    @property
    def value(self) -> Any:
        raise self._error

    def present(self) -> bool:
        raise self._error

    def __iter__(self) -> Any:
        raise self._error


class FaultyDatabase:
    """`inject(point, *codes)`: the next calls at `point` ("read", "commit_before", "commit_after") fail
    with these codes in turn; a None lets that call through."""

    def __init__(self, db: Any, fdb: Any) -> None:
        self._db = db
        self._fdb = fdb
        self.faults: dict[str, deque[int | None]] = {"read": deque(), "commit_before": deque(), "commit_after": deque()}
        self.commit_attempts = 0
        self.commit_sizes: list[int] = []  # get_approximate_size() of every transaction sent to commit

    def inject(self, point: str, *codes: int | None) -> None:
        self.faults[point].extend(codes)

    def fault(self, point: str) -> Exception | None:
        queue = self.faults[point]
        code = queue.popleft() if queue else None
        return None if code is None else self._fdb.FDBError(code)

    def create_transaction(self) -> FaultyTransaction:
        return FaultyTransaction(self, self._db.create_transaction())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class FaultyTransaction:
    def __init__(self, db: FaultyDatabase, tr: Any) -> None:
        self._db = db
        self._tr = tr

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tr, name)

    def get(self, key: bytes) -> Any:
        error = self._db.fault("read")
        return self._tr.get(key) if error is None else _Failed(error)

    def get_range(self, *args: Any, **kwargs: Any) -> Any:
        error = self._db.fault("read")
        return self._tr.get_range(*args, **kwargs) if error is None else _Failed(error)

    def commit(self) -> Any:
        db = self._db
        db.commit_attempts += 1
        db.commit_sizes.append(self._tr.get_approximate_size().wait())
        error = db.fault("commit_before")
        if error is not None:
            return _Failed(error)
        done = self._tr.commit()
        error = db.fault("commit_after")
        if error is None:
            return done
        done.wait()
        return _Failed(error)
