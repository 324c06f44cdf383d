"""Which paths the trail leaves out: gitignore patterns relative to a watch root, plus the daemon's own
private paths (its state directory, the SQLite store) wherever they sit under a root."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pathspec


class IgnoreRules:
    MEMO_SIZE = 1 << 16

    def __init__(self, patterns: Iterable[str], roots: Iterable[Path] = (), private: Iterable[Path] = ()) -> None:
        lines = list(patterns)
        self._memo: dict[tuple[bytes, bool], bool] = {}
        self._private: set[tuple[int, bytes]] = set()
        # The private directories by identity too: renamed by the user (`mv .codi2 x`) they are still ours,
        # and recording the daemon's own writes there would feed back forever.
        self._private_dirs: set[tuple[int, int]] = set()
        # And its files (the journal, the SQLite store and their WAL, shm and lock files): a hard link to one
        # of them elsewhere in the tree must never be opened, for closing any descriptor of a file drops
        # every POSIX lock this process holds on it, and SQLite's locks protect the WAL.
        self._private_files: set[tuple[int, int]] = set()
        self._roots = [os.fsencode(r) for r in roots]
        self.add_private(private)
        # A pattern with a slash before its end is anchored to a place in the tree, so renaming a
        # directory can change what is ignored below it; bare names (".git", "*.log") cannot.
        self.path_dependent = any("/" in _pattern_body(line) for line in lines)
        # Bare names and no negation: a path's verdict is its own name's or an ancestor's, a fast path.
        self._by_name = not self.path_dependent and not any(line.strip().startswith("!") for line in lines)
        # Plain names without wildcards (the usual `.git`, `node_modules`, `target`, `dist`): a set lookup
        # instead of pathspec's regexes, for every new name of a burst. None when any pattern is more.
        self._literal = _literal_names(lines) if self._by_name else None
        # pathspec only for patterns that are more than plain names: the usual ones never import it (some
        # hundreds of KB of the daemon's memory in every pod, for matching it would not do).
        self._spec = _compile(lines) if self._literal is None else None

    def ignored(self, root: int, rel: bytes, is_dir: bool) -> bool:
        """Whether `rel` or a directory above it is left out. Linear in the path's length: a user's tree
        thousands of directories deep made a walk of it cubic (each ancestor sliced and hashed afresh), and
        the watcher thread spun on it while nothing was recorded."""
        if self._private and any(
            r == root and rel.startswith(p) and rel[len(p) : len(p) + 1] in (b"", b"/") for r, p in self._private
        ):
            return True
        if not self._by_name:
            return self._match(rel, is_dir)
        # A path is ignored when its own name or a directory above it is, and names repeat endlessly in
        # a burst (`src/x/f1`, `src/x/f2`): each name is matched once.
        names = rel.split(b"/")
        if self._literal is not None and self._literal.keys().isdisjoint(names):
            return False  # no name of it is a pattern's: the usual answer, in one set operation
        last = len(names) - 1
        return any(self._match(name, is_dir or i < last) for i, name in enumerate(names))

    def add_private(self, paths: Iterable[Path]) -> None:
        """The daemon's own places, by name, and its directories by identity too (once they exist)."""
        for p in paths:
            try:
                st = os.stat(p, follow_symlinks=False)
            except OSError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                self._private_dirs.add((st.st_dev, st.st_ino))
            raw = os.fsencode(p)
            for index, root in enumerate(self._roots):
                if raw.startswith(root + b"/"):
                    self._private.add((index, raw[len(root) + 1 :]))

    def private_dir(self, dev: int | None, ino: int | None) -> bool:
        """Whether this directory is one of the daemon's own, whatever its name now."""
        return (dev, ino) in self._private_dirs

    def add_private_files(self, paths: Iterable[Path]) -> None:
        """The daemon's own files, once they exist (after the journal and the store are open)."""
        for p in paths:
            try:
                st = os.stat(p, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                self._private_files.add((st.st_dev, st.st_ino))

    def private_file(self, dev: int | None, ino: int | None) -> bool:
        """Whether this file is one of the daemon's own (a hard link to it), whatever its name."""
        return (dev, ino) in self._private_files

    def _match(self, text: bytes, is_dir: bool) -> bool:
        if self._literal is not None:
            dir_only = self._literal.get(text)
            return dir_only is not None and (is_dir or not dir_only)
        assert self._spec is not None  # compiled whenever the names are not all literal
        key = (text, is_dir)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            name = os.fsdecode(text).replace("\n", _NEWLINE)
            found = self._memo[key] = self._spec.match_file(name + "/" if is_dir else name)
        return found


# pathspec's regexes treat a newline as no other character: `.` does not match it (`a\nb/node_modules` escaped
# `node_modules`) and `$` matches before it (a file `x.log\n` was left out by `*.log`), where git's wildmatch
# treats it as any other. A lone surrogate stands in for it: no decoded name (fsdecode escapes only bytes
# from 0x80) and no TOML string can hold one, and every wildcard matches it as git's match a newline.
_NEWLINE = "\udc0a"


def _compile(lines: list[str]) -> pathspec.GitIgnoreSpec:
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines)


def _pattern_body(line: str) -> str:
    text = line.strip()
    if not text or text.startswith("#"):
        return ""
    return text.removeprefix("!").rstrip("/")


def _literal_names(lines: list[str]) -> dict[bytes, bool] | None:
    """{name: matches directories only} when every pattern is a plain name (`dist`, `build/`), else None."""
    names: dict[bytes, bool] = {}
    for line in lines:
        text = line.rstrip("\r\n")
        if not text.strip() or text.startswith("#"):
            continue
        body = text[:-1] if text.endswith("/") else text
        if not body or body != body.strip() or any(c in body for c in "*?[\\/!") or body in (".", ".."):
            return None
        raw = os.fsencode(body)
        names[raw] = names.get(raw, True) and text.endswith("/")
    return names
