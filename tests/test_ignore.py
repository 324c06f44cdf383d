"""The ignore rules: the fast path for bare-name patterns must say what pathspec says of the whole path."""

from __future__ import annotations

import os
from pathlib import Path

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
