"""The emulated clock: real monotonic time stretched by a time scale.

Real Kling tasks take minutes; tests cannot wait that long. Every duration the emulator reasons
about is in *emulated* seconds, and one emulated second lasts ``time_scale`` real seconds, so a
90 s task with ``time_scale=0.001`` ends 90 ms after it was created. Nothing schedules a timer
per task: task status is derived from this clock whenever someone looks.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class EmulatedClock:
    """Emulated seconds since :meth:`start`, plus the mapping to Unix milliseconds on the wire.

    The wire timestamps (``created_at``, ``updated_at``, URL expiry) are real Unix milliseconds at
    start plus the emulated offset, so they move as fast as the emulated clock does; that keeps
    ``updated_at - created_at`` equal to the emulated task duration, which is what clients see.
    """

    __slots__ = ("_epoch_ms", "_monotonic", "_origin", "_time_scale", "_wall")

    def __init__(
        self,
        time_scale: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(
                f"time_scale must be > 0 real seconds per emulated second, got {time_scale!r}"
            )
        self._time_scale = time_scale
        self._monotonic = monotonic
        self._wall = wall
        self._origin: float | None = None
        self._epoch_ms = 0.0

    @property
    def time_scale(self) -> float:
        return self._time_scale

    def start(self) -> None:
        """Set emulated time zero to now; before this, :meth:`now` is 0."""
        self._origin = self._monotonic()
        self._epoch_ms = self._wall() * 1000.0

    def now(self) -> float:
        """Emulated seconds since :meth:`start` (0.0 before it)."""
        if self._origin is None:
            return 0.0
        return (self._monotonic() - self._origin) / self._time_scale

    def real_seconds(self, emulated_seconds: float) -> float:
        """How many real seconds an emulated span lasts (never negative)."""
        return max(0.0, emulated_seconds) * self._time_scale

    def unix_ms(self, emulated_time: float) -> int:
        """The wire timestamp (Unix milliseconds) of an emulated instant."""
        return int(self._epoch_ms + emulated_time * 1000.0)
