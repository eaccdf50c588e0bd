"""Retry budgets: exponential backoff with full jitter, bounded in attempts and in time.

Pure arithmetic (the sleeping happens in the caller), so the schedule is testable without a
loop. Full jitter spreads hundreds of clients that failed together, the way AWS's
"exponential backoff and jitter" analysis recommends.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import attrs

__all__ = ["RetryPolicy", "parse_retry_after"]


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"RetryPolicy.{attribute.name}={value!r} is invalid: must be > 0")


def _ratio(_inst: object, attribute: Any, value: float | None) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"RetryPolicy.{attribute.name}={value!r} is invalid: must be >= 0 or None")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How hard to retry a request that failed in a way a retry can fix.

    ``attempts`` counts every try including the first; ``timeout`` caps the seconds spent
    retrying one call; delays start at ``initial`` and double up to ``maximum``, each drawn
    uniformly from [delay/2, delay] so a crowd of clients does not retry in lockstep. A server's
    ``Retry-After`` wins over the computed delay when it is longer.
    """

    attempts: int = attrs.field(default=6, validator=attrs.validators.ge(1))
    timeout: float = attrs.field(default=120.0, validator=_positive)
    initial: float = attrs.field(default=0.5, validator=_positive)
    maximum: float = attrs.field(default=30.0, validator=_positive)
    #: The least a 1302 ("too fast") waits, per the protocol's ">= 1 s".
    throttle_minimum: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    #: The client-wide retry budget: while every request fails, retries add at most this
    #: fraction of the requests offered, plus ``budget_reserve`` (``http.retrying.RetryBudget``).
    #: None: no budget, only the limits above.
    budget_ratio: float | None = attrs.field(default=0.2, validator=_ratio)
    budget_reserve: float = attrs.field(default=3.0, validator=attrs.validators.ge(1))

    def remaining(self, retry_number: int) -> float:
        """The longest the back-off from retry ``retry_number`` to the last would wait: how
        long a retry may wait for room in the retry budget without making a failing call
        slower than its schedule already makes it."""
        total = 0.0
        for number in range(max(1, retry_number), self.attempts):
            total += min(self.maximum, self.initial * 2 ** min(60, number - 1))
        return min(total, self.timeout)

    def delay(
        self,
        retry_number: int,
        *,
        rng: random.Random | None = None,
        retry_after: float | None = None,
        throttled: bool = False,
    ) -> float:
        """Seconds to wait before retry number ``retry_number`` (1 for the first retry)."""
        # The exponent is capped: past 2**60 the maximum has long been reached anyway.
        ceiling = min(self.maximum, self.initial * 2 ** min(60, max(0, retry_number - 1)))
        if throttled:
            ceiling = max(ceiling, self.throttle_minimum)
        draw = (rng or random).uniform(ceiling / 2, ceiling)
        if throttled:
            draw = max(draw, self.throttle_minimum)
        if retry_after is not None:
            draw = max(draw, retry_after)
        return draw


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None if absent or garbage."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), 3600.0)  # a date in the past means "now"
