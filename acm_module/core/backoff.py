"""Jittered exponential backoff, the one every retry loop of acm uses.

"Equal jitter" as redis-py's `EqualJitterBackoff` computes it: the n-th delay is half of
min(cap, base * 2**n) plus a random share of the other half, so processes that failed together
(workers on one store, writers on one database) do not retry in step, and none retries at once.
"""

from __future__ import annotations

import random


class Backoff:
    """Count consecutive failures and say how long to wait before the next attempt."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def compute(self, failures: int) -> float:
        """Return the delay after `failures` earlier failures (0: the first retry)."""
        d = min(self.cap, self.base * (2 ** min(failures, 30)))
        return d / 2 + self._rng.uniform(0, d / 2)

    def next(self) -> float:
        """Return the delay before the next attempt and count a failure."""
        d = self.compute(self.failures)
        self.failures += 1
        return d

    def reset(self) -> None:
        """Forget the failures (after a success)."""
        self.failures = 0
