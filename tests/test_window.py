"""The batch window (`codi2.pipeline.window`): coalescing per path, renames carrying queued hints, restore
order. Pure logic, no disk."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from codi2.pipeline.window import Window
from codi2.watch.hints import Hint, Move, Rescan, RootReplaced, Touch


def _window(*hints: Hint) -> list[Hint]:
    window = Window()
    for hint in hints:
        window.add(hint)
    return window.take()


def test_hints_coalesce_per_path_keeping_the_first_place() -> None:
    assert _window(Touch(0, b"f"), Touch(0, b"g"), Touch(0, b"f")) == [Touch(0, b"f"), Touch(0, b"g")]
    assert _window(Rescan(0, b"d", False), Rescan(0, b"d", True)) == [Rescan(0, b"d", True)]
    assert _window(Rescan(0, b"d", True), Rescan(0, b"d", False)) == [Rescan(0, b"d", True)]


def test_a_rename_carries_the_hints_below_it_and_drops_what_it_replaced() -> None:
    got = _window(
        Touch(0, b"out.tmp"),
        Touch(0, b"out.tmp/f1"),
        Touch(0, b"out/old"),
        Touch(0, b"other"),
        Move(0, b"out.tmp", b"out", True, 7),
        Touch(0, b"out/f1"),
    )
    assert got == [Touch(0, b"other"), Move(0, b"out.tmp", b"out", True, 7), Touch(0, b"out"), Touch(0, b"out/f1")]


def test_a_file_rename_carries_its_own_hint_only() -> None:
    got = _window(Touch(0, b".f.swp"), Touch(0, b"f"), Touch(0, b".f.swpx"), Move(0, b".f.swp", b"f", False, None))
    assert got == [Touch(0, b".f.swpx"), Move(0, b".f.swp", b"f", False, None), Touch(0, b"f")]


def test_a_hint_of_another_type_at_the_source_stays_there() -> None:
    """RENAME_EXCHANGE of a directory at a name ignored only as a directory with the file `d`: the
    directory appears at `d` (a hint there), the file moves from `d`; the hint is not the file's."""
    got = _window(Touch(0, b"d", True, True), Move(0, b"d", b"logs", False, None))
    assert got == [Move(0, b"d", b"logs", False, None), Touch(0, b"d", True, True)]
    got = _window(Touch(0, b"d", True, False), Move(0, b"d", b"x", True, 7))
    assert got == [Move(0, b"d", b"x", True, 7), Touch(0, b"x", True, False), Touch(0, b"d", True, False)]


def test_restored_hints_go_before_newer_ones() -> None:
    window = Window()
    window.add(Touch(0, b"new"))
    window.restore([Touch(0, b"old"), Touch(0, b"new")])
    assert window.take() == [Touch(0, b"old"), Touch(0, b"new")]


@given(st.lists(st.sampled_from([b"a", b"b", b"a/x", b"b/x", b"c"]), max_size=12))
def test_window_never_loses_a_path_without_a_rename(paths: list[bytes]) -> None:
    assert {h.path for h in _window(*(Touch(0, p) for p in paths))} == set(paths)  # type: ignore[union-attr]


def test_a_created_hint_replaces_a_plain_one_in_its_place() -> None:
    got = _window(Touch(0, b"f"), Touch(0, b"g"), Touch(0, b"f", True), Touch(0, b"f"))
    assert got == [Touch(0, b"f", True), Touch(0, b"g")]


def test_rescans_merge_under_the_start_up_scans_name() -> None:
    assert _window(Rescan(0, b"", False, "live"), Rescan(0, b"", True, "baseline")) == [
        Rescan(0, b"", True, "baseline")
    ]
    assert _window(Rescan(0, b"", True, "offline"), Rescan(0, b"", False, "rescan")) == [
        Rescan(0, b"", True, "offline")
    ]
    assert _window(Rescan(0, b"a", False), Rescan(1, b"a", False)) == [Rescan(0, b"a", False), Rescan(1, b"a", False)]


def test_a_directory_rename_carries_rescans_and_leaves_other_roots_alone() -> None:
    got = _window(Rescan(0, b"a/sub", True), Touch(1, b"a/x"), Move(0, b"a", b"b", True, 3))
    assert got == [Touch(1, b"a/x"), Move(0, b"a", b"b", True, 3), Rescan(0, b"b/sub", True)]


def test_restored_hints_coalesce_with_newer_ones_and_keep_the_older_place() -> None:
    window = Window()
    window.add(Touch(0, b"c"))
    window.add(Touch(0, b"a", True))
    window.restore([Touch(0, b"a"), Touch(0, b"b")])
    assert window.take() == [Touch(0, b"a", True), Touch(0, b"b"), Touch(0, b"c")]
    assert len(window) == 0


def test_a_rename_after_a_restore_carries_the_restored_hints() -> None:
    window = Window()
    window.add(Move(0, b"d", b"e", True, None))
    window.restore([Touch(0, b"d/f", True)])
    assert window.take() == [Move(0, b"d", b"e", True, None), Touch(0, b"e/f", True)]


def test_a_later_appearance_of_another_type_wins_its_type() -> None:
    """dir -> file -> dir at one name within one window (issue #22, defect 2): the directory made last is
    what the reconciler must walk, so the window must not keep the file's `created` hint."""
    got = _window(Touch(0, b"d", False, True), Touch(0, b"d", True, False), Touch(0, b"d"), Touch(0, b"d", True, True))
    assert got == [Touch(0, b"d", True, True)]
    assert _window(Touch(0, b"d", True, True), Touch(0, b"d", True, False)) == [Touch(0, b"d", True, False)]
    assert _window(Touch(0, b"d", True, True), Touch(0, b"d", False, True)) == [Touch(0, b"d", True, True)]


def test_a_replaced_root_is_read_again_once_and_a_rename_leaves_it_in_place() -> None:
    got = _window(RootReplaced(0), Touch(0, b"d/f"), RootReplaced(0), Move(0, b"d", b"e", True, 3), RootReplaced(1))
    assert got == [RootReplaced(0), Move(0, b"d", b"e", True, 3), Touch(0, b"e/f"), RootReplaced(1)]
