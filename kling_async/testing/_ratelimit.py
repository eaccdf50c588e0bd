"""The request-rate limit behind code 1302: a token bucket over real time.

Rate limits protect the server's real capacity, so they run on real seconds, not on the emulated
clock: a client's request pacing is what is being tested, and that pacing is in real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` requests per real second on average, bursts of up to ``burst``."""

    __slots__ = ("_burst", "_last", "_monotonic", "_rate", "_tokens")

    def __init__(
        self, rate: float, burst: int, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate_limit must be > 0 requests per second or None, got {rate!r}")
        if burst < 1:
            raise ValueError(f"rate_burst must be >= 1, got {burst!r}")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._monotonic = monotonic
        self._last = monotonic()

    def try_acquire(self) -> bool:
        """Take a token if one is available; never waits."""
        now = self._monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
