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
    """Emulated seconds since :meth:`start`, and the real (wall-clock) instant of each of them.

    The wire timestamps (``created_at``, ``updated_at``, the URL ``expires`` parameter) are
    **wall-clock** Unix milliseconds: the real instant at which an emulated instant happens, not
    emulated time stretched. A client comparing ``created_at`` with its own ``time.time()`` (to
    log a task's age, to judge an expiry) sees true real time, and a task that takes 90 emulated
    seconds at ``time_scale=0.001`` shows ``updated_at - created_at == 90`` ms, which is how long
    it really took. (Earlier builds advanced the stamps at emulated speed, so they drifted away
    from the client's clock.) The same mapping, :meth:`wall_time` and :meth:`at_wall`, is what
    lets a state file store instants as real times that a restarted emulator, even one with
    another time scale, sees at the same real moments.
    """

    __slots__ = ("_epoch", "_monotonic", "_origin", "_time_scale", "_wall")

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
        self._epoch = 0.0

    @property
    def time_scale(self) -> float:
        return self._time_scale

    def start(self) -> None:
        """Set emulated time zero to now; before this, :meth:`now` is 0."""
        self._origin = self._monotonic()
        self._epoch = self._wall()

    def now(self) -> float:
        """Emulated seconds since :meth:`start` (0.0 before it)."""
        if self._origin is None:
            return 0.0
        return (self._monotonic() - self._origin) / self._time_scale

    def real_seconds(self, emulated_seconds: float) -> float:
        """How many real seconds an emulated span lasts (never negative)."""
        return max(0.0, emulated_seconds) * self._time_scale

    def wall_time(self, emulated_time: float) -> float:
        """The real Unix time (seconds) at which the emulated instant happens (or happened).

        Monotonic time drives the clock, so a wall-clock step during a run does not move tasks;
        the mapping is fixed at :meth:`start`.
        """
        return self._epoch + emulated_time * self._time_scale

    def at_wall(self, wall_time: float) -> float:
        """The emulated instant of a real Unix time (negative for one before :meth:`start`)."""
        return (wall_time - self._epoch) / self._time_scale

    def unix_ms(self, emulated_time: float) -> int:
        """The wire timestamp: wall-clock Unix milliseconds of an emulated instant."""
        return int(self.wall_time(emulated_time) * 1000.0)
