"""Fold a trail into the workspace state it implies: the check operators run against a disk.

created/updated set a path's entry, deleted removes it, moved renames it; deleting or moving a
directory takes everything below it along. Folding a complete trail in commit order reproduces every
non-ignored entry of the workspace with its sha256.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from codi2.events import Event


@dataclass(frozen=True, slots=True)
class Entry:
    type: str
    sha256: str | None


State = dict[tuple[str, str], Entry]


def _subtree(state: State, root: str, path: str) -> list[tuple[str, str]]:
    prefix = path + "/"
    return [key for key in state if key[0] == root and (key[1] == path or key[1].startswith(prefix))]


def fold(events: Iterable[Event], state: State | None = None) -> State:
    """Apply events in order to `state` (a new one by default) and return it."""
    state = {} if state is None else state
    for e in events:
        key = (e.root, e.path)
        if e.action in ("created", "updated"):
            state[key] = Entry(e.type, e.sha256)
        elif e.action == "deleted":
            if e.type != "dir":
                state.pop(key, None)
                continue
            for k in _subtree(state, e.root, e.path):
                del state[k]
        elif e.action == "moved" and e.dest_path is not None:
            moved = {k: state.pop(k) for k in _subtree(state, e.root, e.path)}
            for k in _subtree(state, e.root, e.dest_path):  # a rename replaces what was at the target
                del state[k]
            for (root, path), entry in moved.items():
                state[(root, e.dest_path + path[len(e.path) :])] = entry
            old = moved.get(key)
            state[(e.root, e.dest_path)] = Entry(e.type, e.sha256 or (old.sha256 if old else None))
    return state


def disk_state(root: Path, ignore_patterns: Iterable[str]) -> State:
    """What a complete trail of `root` must fold to: every non-ignored entry, files with their sha256."""
    from codi2.index import walk
    from codi2.watcher import IgnoreRules

    raw_root = os.fsencode(root)
    state: State = {}
    for rel, entry in walk(raw_root, b"", IgnoreRules(ignore_patterns)):
        sha = None
        if entry.type == "file":
            with open(os.path.join(raw_root, rel), "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
        state[(str(root), os.fsdecode(rel))] = Entry(entry.type, sha)
    return state
