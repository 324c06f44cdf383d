"""The file-state index as the reconciler sees it: what the trail says exists, keyed by root and path key.

A protocol naming exactly the calls the reconciler makes, so it depends on no journal class: the journal
implements it in SQLite (inside the flush's transaction), a test with a dict. Keys are relative paths with
`/` replaced by `\\x00` (`codi2.disk.fs.key_of`), so a directory's subtree is one key range.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from codi2.disk.fs import Facts


class Index(Protocol):
    def get(self, root: str, key: bytes) -> Facts | None: ...

    def get_many(self, root: str, keys: list[bytes]) -> dict[bytes, Facts]:
        """The entries of those keys that the index holds."""
        ...

    def below(self, root: str, key: bytes, start: bytes, limit: int) -> list[tuple[bytes, Facts]]:
        """Up to `limit` entries strictly below `key` from `start` on (inclusive), in key order."""
        ...

    def below_reversed(self, root: str, key: bytes) -> Iterable[tuple[bytes, str]]:
        """(key, type) of every entry below `key`, every entry after all of its descendants."""
        ...

    def put_many(self, rows: list[tuple[str, bytes, Facts]]) -> None: ...

    def drop_tree(self, root: str, key: bytes) -> None:
        """Forget `key` and everything below it."""
        ...

    def move_tree(self, root: str, src: bytes, dst: bytes) -> None:
        """The entry at `src` and everything below it now live at `dst` (what was at `dst` is replaced)."""
        ...

    def linked(self, dev: int, ino: int) -> list[tuple[str, bytes]]:
        """Every indexed (root, key) of an inode."""
        ...
