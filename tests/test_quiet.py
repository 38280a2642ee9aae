"""``router.quiet.Repeats``: one warning a window per cause, then a count.

Sans-IO, so the clock is the test's: windows end when the test says.  The
router's use of it is tested end to end in test_proxy.py and
test_internal.py.
"""

from __future__ import annotations

import math

from router.quiet import Repeats


def test_the_first_line_of_a_cause_goes_through_and_the_rest_are_counted() -> None:
    repeats = Repeats(window=10.0)
    assert repeats.let_through("down a", 100.0) == 0
    held = [repeats.let_through("down a", 100.0 + i) for i in range(1, 10)]
    assert held == [None] * 9
    # Another cause has a window of its own.
    assert repeats.let_through("down b", 105.0) == 0
    assert repeats.ended(109.9) == []

    # When a window ends the count comes out once, and the cause starts
    # afresh; a window that held nothing back is forgotten quietly.
    assert repeats.ended(110.0) == [("down a", 9)]
    assert repeats.ended(115.0) == []
    assert len(repeats) == 0
    assert repeats.let_through("down a", 120.0) == 0


def test_a_cause_back_after_its_window_gets_the_old_count_first() -> None:
    # The cause comes back after its window ended but before anyone asked
    # ``ended``: the count of the old window comes with the new first line,
    # so that it can be told before it, in order.
    repeats = Repeats(window=10.0)
    assert repeats.let_through("x", 0.0) == 0
    assert repeats.let_through("x", 5.0) is None
    assert repeats.let_through("x", 6.0) is None
    assert repeats.let_through("x", 12.0) == 2
    assert repeats.let_through("x", 13.0) is None
    assert repeats.ended(13.0) == []
    assert repeats.ended(22.0) == [("x", 1)]
    assert len(repeats) == 0


def test_on_the_way_out_every_count_comes_out() -> None:
    repeats = Repeats(window=10.0)
    for now in (0.0, 1.0, 2.0):
        repeats.let_through("a", now)
    repeats.let_through("b", 3.0)
    assert repeats.ended(math.inf) == [("a", 2)]
    assert len(repeats) == 0
