"""Warnings that repeat: one line a window for each cause, then a count.

A sandbox that is down makes a warning on every request sent to it. Under
load, or behind a page that retries, that is thousands of identical lines a
second, which bury everything else in the log and cost the router the time
to write them.  ``Repeats`` lets the first line of a cause through, counts
the ones that follow for ``window`` seconds instead, and when that window
ends hands back the count, for one summary line.

Sans-IO: the caller passes the time and writes the lines.
"""

from __future__ import annotations

from collections.abc import Hashable

WINDOW_SECONDS = 10.0


class Repeats:
    """Which lines of a repeated warning to write, and what was held back."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        # cause → [when its window began, lines held back since]
        self._open: dict[Hashable, list[float]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def let_through(self, cause: Hashable, now: float) -> int | None:
        """None to hold this line back (it is counted); else write it.

        The number is how many lines of this cause the window that has
        just ended held back, to be told before this line (0: none).
        """
        seen = self._open.get(cause)
        if seen is not None and now - seen[0] < self.window:
            seen[1] += 1
            return None
        self._open[cause] = [now, 0.0]
        return 0 if seen is None else int(seen[1])

    def ended(self, now: float) -> list[tuple[Hashable, int]]:
        """Causes whose window is over, with the lines held back in it.

        Called now and then (the proxy's sweeper, every second), and with
        ``now`` at infinity on the way out, so that no count is lost; a
        window that held nothing back is forgotten without a line.
        Nothing is kept beyond a window, so memory follows the causes of
        the last ``window`` seconds, not all causes ever seen.
        """
        over = [c for c, (begun, _) in self._open.items() if now - begun >= self.window]
        counts = [(c, int(self._open.pop(c)[1])) for c in over]
        return [(cause, held) for cause, held in counts if held]
