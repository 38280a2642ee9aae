"""``router.quiet.Repeats``: one warning a window per cause, then a count.

Sans-IO, so the clock is the test's: windows end when the test says.  The
router's use of it is tested end to end in test_proxy.py.
"""

from __future__ import annotations

from router.quiet import Repeats


def test_the_first_line_of_a_cause_goes_through_and_the_rest_are_counted() -> None:
    repeats = Repeats(window=10.0)
    assert repeats.let_through("down a", 100.0) is True
    assert [repeats.let_through("down a", 100.0 + i) for i in range(1, 10)] == [
        False
    ] * 9
    # Another cause has a window of its own.
    assert repeats.let_through("down b", 105.0) is True
    assert repeats.ended(109.9) == []

    # When a window ends the count comes out once, and the cause starts
    # afresh; a window that held nothing back is forgotten quietly.
    assert repeats.ended(110.0) == [("down a", 9)]
    assert repeats.ended(115.0) == []
    assert len(repeats) == 0
    assert repeats.let_through("down a", 120.0) is True


def test_a_cause_back_after_its_window_keeps_the_count_of_the_one_before() -> None:
    # The cause comes back after its window ended but before anyone asked
    # ``ended``: its line goes through, and the old count is not lost.
    repeats = Repeats(window=10.0)
    assert repeats.let_through("x", 0.0) is True
    assert repeats.let_through("x", 5.0) is False
    assert repeats.let_through("x", 12.0) is True
    assert repeats.let_through("x", 13.0) is False
    assert repeats.ended(13.0) == [("x", 1)]
    assert repeats.ended(22.0) == [("x", 1)]
    assert len(repeats) == 0
