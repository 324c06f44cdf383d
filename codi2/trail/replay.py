"""Fold a trail into the workspace state it implies: the check operators run against a disk.

created/updated set a path's entry, deleted removes it, moved renames it; deleting or moving a
directory takes everything below it along. Folding a complete trail in commit order reproduces every
non-ignored entry of the workspace with its sha256, its owner and a symlink's target. An owner change is
an `updated` carrying the new owner: the old one is the entry's state before it, the previous event.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from codi2.disk.ignore import IgnoreRules
from codi2.disk.walk import walk
from codi2.trail.events import Event


@dataclass(frozen=True, slots=True)
class Entry:
    """An entry as the trail implies it: enough to rebuild the tree (a symlink's `target`) and to say who
    owns it. The owner and target are None in a trail written before events carried them."""

    type: str
    sha256: str | None
    uid: int | None = None
    gid: int | None = None
    target: str | None = None

    def matches(self, disk: Entry) -> bool:
        """Whether the disk holds what the trail says, where the trail knows it: an owner or target the trail
        never recorded (a record of version 1) is not a difference."""
        if self == disk:
            return True
        known = Entry(
            self.type,
            self.sha256,
            disk.uid if self.uid is None else self.uid,
            disk.gid if self.gid is None else self.gid,
            disk.target if self.target is None else self.target,
        )
        return known == disk


State = dict[tuple[str, str], Entry]


def _subtree(state: dict[tuple[str, str], Event], root: str, path: str) -> list[tuple[str, str]]:
    prefix = path + "/"
    return [key for key in state if key[0] == root and (key[1] == path or key[1].startswith(prefix))]


def _renamed(before: Event, moved: Event) -> Event:
    """The entry's last event, with the owner and target the rename found (changed in the same window as
    it, they have no event of their own); what the rename did not know stays as it was."""
    return before._replace(
        uid=before.uid if moved.uid is None else moved.uid,
        gid=before.gid if moved.gid is None else moved.gid,
        target=before.target if moved.target is None else moved.target,
    )


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
            state[(e.root, e.dest_path)] = e if e.sha256 or key not in moved else _renamed(moved[key], e)
    return state


def fold(events: Iterable[Event]) -> State:
    """Apply events in order and return each entry's type, sha256, owner and symlink target."""
    return {key: Entry(e.type, e.sha256, e.uid, e.gid, e.target) for key, e in fold_events(events).items()}


@dataclass(frozen=True, slots=True)
class Disk:
    """A tree as a complete trail of it must fold to (`state`), and what of it could not be read
    (`unknown`, path to why): an entry not examined is not in `state`; a directory not listed is, without
    what is below it; a file whose contents could not be read is, without its hash."""

    state: State
    unknown: dict[str, str]


def read_disk(path: Path, rules: IgnoreRules, hash_max: int, root: str | None = None) -> Disk:
    """Walk `path` as the daemon does (`codi2.disk.walk`) and key its entries by `root` (by default
    `path` itself): every entry the rules keep, files hashed up to `hash_max` bytes."""
    name = str(path) if root is None else root
    state: State = {}
    unknown: dict[str, str] = {}
    for seen in walk(path, rules, hash_max):
        rel = os.fsdecode(seen.rel)
        if seen.facts is not None:
            f = seen.facts
            target = None if f.target is None else os.fsdecode(f.target)
            state[(name, rel)] = Entry(f.type, f.sha256, f.uid, f.gid, target)
        if seen.problem is not None:
            unknown[rel] = seen.problem
    return Disk(state, unknown)
