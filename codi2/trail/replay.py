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

from codi2.trail.events import Event


@dataclass(frozen=True, slots=True)
class Entry:
    type: str
    sha256: str | None


State = dict[tuple[str, str], Entry]


def _subtree(state: dict[tuple[str, str], Event], root: str, path: str) -> list[tuple[str, str]]:
    prefix = path + "/"
    return [key for key in state if key[0] == root and (key[1] == path or key[1].startswith(prefix))]


def fold_events(
    events: Iterable[Event], state: dict[tuple[str, str], Event] | None = None
) -> dict[tuple[str, str], Event]:
    """The last event that set each entry still present after `events` (applied to `state`, a new one by
    default), keyed by (root, path) where the entry is now, after renames."""
    state = {} if state is None else state
    for e in events:
        key = (e.root, e.path)
        if e.action in ("created", "updated"):
            state[key] = e
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
            for (root, path), event in moved.items():
                state[(root, e.dest_path + path[len(e.path) :])] = event
            state[(e.root, e.dest_path)] = e if e.sha256 or key not in moved else moved[key]
    return state


def fold(events: Iterable[Event]) -> State:
    """Apply events in order and return each entry's type and sha256."""
    return {key: Entry(e.type, e.sha256) for key, e in fold_events(events).items()}


def disk_state(root: Path, ignore_patterns: Iterable[str]) -> State:
    """What a complete trail of `root` must fold to: every non-ignored entry, files with their sha256."""
    from codi2.disk.ignore import IgnoreRules

    rules = IgnoreRules(ignore_patterns)
    raw_root = os.fsencode(root)
    state: State = {}
    for dirpath, dirnames, filenames in os.walk(raw_root):
        rel_dir = os.path.relpath(dirpath, raw_root) if dirpath != raw_root else b""
        kept = []
        for name in sorted(dirnames):
            rel = os.path.join(rel_dir, name) if rel_dir else name
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                if not rules.ignored(0, rel, False):
                    state[(str(root), os.fsdecode(rel))] = Entry("symlink", None)
                continue
            if not rules.ignored(0, rel, True):
                kept.append(name)
                state[(str(root), os.fsdecode(rel))] = Entry("dir", None)
        dirnames[:] = kept
        for name in filenames:
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if rules.ignored(0, rel, False):
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                state[(str(root), os.fsdecode(rel))] = Entry("symlink", None)
                continue
            with open(full, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
            state[(str(root), os.fsdecode(rel))] = Entry("file", sha)
    return state
