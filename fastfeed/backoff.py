"""The one back-off every retry loop of fastfeed uses: the login's HTTP requests, the
WebSocket session's reconnects and the pub/sub sources' reconnects.

Capped exponential back-off with jitter: ``first``, then doubling up to ``cap``, each delay
drawn from ``[d/2, d]`` so that many clients that lost the feed at the same instant do not
come back in step. The first retry is fast (a dropped connection is usually a one-off);
:meth:`Backoff.next` with the lifetime of the connection that just ended starts again from
``first`` once that connection was healthy for ``reset_after`` seconds.
"""

from __future__ import annotations

import math
import random

__all__ = ["Backoff"]


class Backoff:
    """Capped exponential back-off with jitter (see the module doc)."""

    def __init__(self, first: float, cap: float, reset_after: float = math.inf,
                 rng: random.Random | None = None) -> None:
        if first < 0 or cap < first:
            raise ValueError("back-off needs 0 <= first <= cap")
        self.first, self.cap, self.reset_after = first, cap, reset_after
        self._attempt = 0
        self._rng = rng or random.Random()

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset: the number of the retry about to happen."""
        return self._attempt

    def next(self, healthy_for: float = 0.0) -> float:
        """The delay before the next attempt; ``healthy_for``: how long the last connection
        lived (a long-lived one resets the back-off)."""
        if healthy_for >= self.reset_after:
            self._attempt = 0
        delay = min(self.cap, self.first * (2 ** min(self._attempt, 62))) if self.first else 0.0
        self._attempt += 1
        return self._rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        """Start again from the first delay."""
        self._attempt = 0
