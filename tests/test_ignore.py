"""The ignore rules: the fast path for bare-name patterns must say what pathspec says of the whole path."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from conftest import WAIT_S
from hypothesis import given
from hypothesis import strategies as st

from codi2.disk.ignore import IgnoreRules

NAMES = st.sampled_from(["a", "node_modules", ".git", "keep.log", "x.log", "build", "dist", "src", "caf\xe9"])
PATTERN_SETS = st.sampled_from(
    [
        [".git", "node_modules", "target", "dist"],
        ["build/", "x.log", "dist", "dist/", "# a comment", ""],  # plain names: the set lookup
        ["build/", "caf\xe9", "src/"],
        ["*.log", "!keep.log"],
        ["build/", "*.log", "!keep.log", "node_modules"],
        ["logs/*.log", "!keep.log"],  # anchored: the slow, exact path
        ["**/build", "a/x.log"],
    ]
)


@given(PATTERN_SETS, st.lists(NAMES, min_size=1, max_size=5), st.booleans())
def test_rules_agree_with_pathspec_on_whole_paths(patterns: list[str], parts: list[str], is_dir: bool) -> None:
    import pathspec

    spec = pathspec.GitIgnoreSpec.from_lines(patterns)
    rel = "/".join(parts)
    expected = spec.match_file(rel + "/" if is_dir else rel)
    assert IgnoreRules(patterns).ignored(0, os.fsencode(rel), is_dir) == expected


def test_private_paths_and_everything_below_them_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    rules = IgnoreRules([".git"], [root], [root / ".codi2", root / "audit.db"])
    assert rules.ignored(0, b".codi2", True)
    assert rules.ignored(0, b".codi2/journal.db", False)
    assert rules.ignored(0, b"audit.db", False)
    assert not rules.ignored(0, b"audit.db2", False)
    assert rules.path_dependent is False
    assert IgnoreRules(["logs/*.log"]).path_dependent is True


def test_a_path_deeper_than_the_recursion_limit_is_fine() -> None:
    assert not IgnoreRules([".git"]).ignored(0, b"/".join([b"d"] * 5000), False)


def test_a_path_thousands_of_directories_deep_is_judged_in_one_pass() -> None:
    """A user's `mkdir` chain 4,400 deep (255-byte names) held the watcher thread for good: each entry's
    verdict sliced and hashed every ancestor's path afresh, so walking the tree cost its depth cubed and
    nothing was recorded meanwhile. One pass over the path now: this 8 MB one is judged at once."""
    rules = IgnoreRules([".git", "node_modules"], roots=[Path("/ws")], private=[Path("/ws/.codi2")])
    rel = b"/".join([b"d" * 200] * 40_000) + b"/f"
    verdict: list[bool] = []
    done = threading.Event()

    def judge() -> None:
        verdict.append(rules.ignored(0, rel, False))
        verdict.append(rules.ignored(0, b".codi2/" + rel, False))
        done.set()

    threading.Thread(target=judge, daemon=True).start()
    assert done.wait(WAIT_S) and verdict == [False, True]
