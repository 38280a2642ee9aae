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
    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        # cause → [when its window began, lines held back since]
        self._open: dict[Hashable, list[float]] = {}
        # Windows that ended when their cause came back, before ``ended``
        # was asked: their counts wait here for it.
        self._closed: list[tuple[Hashable, int]] = []

    def __len__(self) -> int:
        return len(self._open)

    def let_through(self, cause: Hashable, now: float) -> bool:
        """Whether to write this line: the first of its cause in a window."""
        seen = self._open.get(cause)
        if seen is None or now - seen[0] >= self.window:
            if seen is not None and seen[1]:
                self._closed.append((cause, int(seen[1])))
            self._open[cause] = [now, 0.0]
            return True
        seen[1] += 1
        return False

    def ended(self, now: float) -> list[tuple[Hashable, int]]:
        """Causes whose window is over, with the lines held back in it.

        Called now and then (the proxy's sweeper, every second); a window
        that held nothing back is forgotten without a line.  Nothing is
        kept beyond a window, so memory follows the causes of the last
        ``window`` seconds, not all causes ever seen.
        """
        over = [c for c, (begun, _) in self._open.items() if now - begun >= self.window]
        counts = self._closed + [(c, int(self._open.pop(c)[1])) for c in over]
        self._closed = []
        return [(cause, held) for cause, held in counts if held]
