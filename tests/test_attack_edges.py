"""Edges found by attacking the ignore rules' fast path with real processes: what held is in the report of
the branch that added this file; what broke is here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, disk_state, wait_for, write_config
from trail_checks import assert_no_defects, describe, diff, lagging

from codi2.disk.ignore import IgnoreRules
from codi2.trail.replay import fold

LITERAL = (".git", "node_modules", "target", "dist", "build/")


def _names_with_newlines(ws: Path) -> None:
    (ws / "a\nb" / "node_modules").mkdir(parents=True)
    (ws / "a\nb" / "node_modules" / "x").write_text("under an ignored name: out")
    (ws / "a\nb" / "f").write_text("in")
    (ws / "node_modules\n").write_text("not the name `node_modules`: in")
    (ws / "z.tmp\n").write_text("does not end in `.tmp`: in")
    (ws / "y.tmp").write_text("out")
    (ws / "keep.tmp").write_text("re-included by the negation")


@pytest.mark.parametrize("extra", [("*.tmp",), ("*.tmp", "!keep.tmp")], ids=["wildcard", "negation"])
@pytest.mark.parametrize("lag", [False, True], ids=["live", "lagging"])
def test_a_newline_in_a_name_is_a_character_like_any_other_in_every_mode_of_the_rules(
    tmp_path: Path,
    workspace: Path,
    spawned: Callable[[DaemonProcess], DaemonProcess],
    extra: tuple[str, ...],
    lag: bool,
) -> None:
    """A wildcard (`*.tmp`) turns the set lookup of plain names off, a negation the matching name by name:
    pathspec's regexes then judged names with a newline unlike git (`.` misses it, `$` matches before it).
    A file `node_modules\\n` or `z.tmp\\n`, which no pattern names, was left out of the trail, and with a
    negation `a\\nb/node_modules` was recorded; the plain-name rules (git's answer) are the reference."""
    patterns = [*LITERAL, *extra]
    db = tmp_path / "audit.db"
    config = write_config(tmp_path / "codi2.toml", workspace, db)
    default = 'ignore_patterns = [".git", "node_modules", "target", "dist"]'
    config.write_text(config.read_text().replace(default, f"ignore_patterns = {json.dumps(patterns)}"))
    daemon = spawned(DaemonProcess(config, db))
    if lag:
        with lagging(daemon):
            _names_with_newlines(workspace)
    else:
        _names_with_newlines(workspace)
    out = {"y.tmp"} if "!keep.tmp" in extra else {"y.tmp", "keep.tmp"}
    expected = disk_state(workspace, (*LITERAL, ".codi2"), lambda rel, _: rel in out)
    assert {"node_modules\n", "z.tmp\n", "a\nb/f"} <= {rel for _, rel in expected}
    assert "a\nb/node_modules" not in {rel for _, rel in expected}
    try:
        wait_for(lambda: fold(daemon.events()) == expected)
    except AssertionError:
        events = daemon.events()
        raise AssertionError(f"{diff(fold(events), expected)}\n{describe(events)}") from None
    assert_no_defects(daemon.events())


@pytest.mark.parametrize("patterns", [["*.log"], ["node_modules", "*.log"], ["node_modules", "!keep"], ["**/x"]])
def test_the_rules_judge_names_with_newlines_as_git_check_ignore_does(patterns: list[str]) -> None:
    """Verdicts of `git check-ignore --no-index` for these patterns (git 2.x, recorded by hand)."""
    rules = IgnoreRules(patterns)
    git = {
        b"x.log\n": False,
        b"\nx.log": "*.log" in patterns,
        b"a\nb/x.log": "*.log" in patterns,
        b"a\nb/node_modules/f": "node_modules" in patterns,
        b"node_modules\n": False,
        b"a\nb/x": "**/x" in patterns,
    }
    assert {rel: rules.ignored(0, rel, False) for rel in git} == git
