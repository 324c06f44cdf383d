"""Which paths the trail leaves out: gitignore patterns relative to a watch root, plus the daemon's own
private paths (its state directory, the SQLite store) wherever they sit under a root."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pathspec


class IgnoreRules:
    MEMO_SIZE = 8192

    def __init__(self, patterns: Iterable[str], roots: Iterable[Path] = (), private: Iterable[Path] = ()) -> None:
        lines = list(patterns)
        self._spec = pathspec.GitIgnoreSpec.from_lines(lines)
        self._memo: dict[tuple[int, bytes, bool], bool] = {}
        self._private: set[tuple[int, bytes]] = set()
        root_list = [os.fsencode(r) for r in roots]
        for p in private:
            raw = os.fsencode(p)
            for index, root in enumerate(root_list):
                if raw.startswith(root + b"/"):
                    self._private.add((index, raw[len(root) + 1 :]))
        # A pattern with a slash before its end is anchored to a place in the tree, so renaming a
        # directory can change what is ignored below it; bare names (".git", "*.log") cannot.
        self.path_dependent = any("/" in _pattern_body(line) for line in lines)

    def ignored(self, root: int, rel: bytes, is_dir: bool) -> bool:
        key = (root, rel, is_dir)
        found = self._memo.get(key)
        if found is None:
            # A written file shows up as three events (create, modify, close): match it once.
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            if (root, rel) in self._private:
                found = True
            else:
                text = os.fsdecode(rel)
                found = self._spec.match_file(text + "/" if is_dir else text)
            self._memo[key] = found
        return found


def _pattern_body(line: str) -> str:
    text = line.strip()
    if not text or text.startswith("#"):
        return ""
    return text.removeprefix("!").rstrip("/")
