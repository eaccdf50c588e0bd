"""When to poll a task next.

Tasks take minutes and the client pays per request, so polling at a fixed short interval
wastes requests early and a long one adds lag late. The policy here spends few polls while a
task is young, then tightens around the time it is expected to end.
"""

from __future__ import annotations

import random

import attrs

__all__ = ["PollPolicy"]


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"PollPolicy.{attribute.name}={value!r} is invalid: must be > 0")


@attrs.frozen(kw_only=True)
class PollPolicy:
    """Bounds for polling one task, in seconds.

    ``min_interval`` and ``max_interval`` bound the gap between two polls of one task;
    ``initial_estimate`` is the duration assumed for a task of a kind never seen yet. The
    defaults suit real Kling, where tasks take minutes; against a time-scaled emulator, scale
    all three by the emulator's ``time_scale``. ``jitter`` is the +/- fraction applied to each
    gap so that tasks submitted together do not poll in lockstep.
    """

    min_interval: float = attrs.field(default=2.0, validator=_positive)
    max_interval: float = attrs.field(default=30.0, validator=_positive)
    initial_estimate: float = attrs.field(default=90.0, validator=_positive)
    jitter: float = attrs.field(
        default=0.1, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)]
    )

    def __attrs_post_init__(self) -> None:
        if self.max_interval < self.min_interval:
            raise ValueError(
                f"PollPolicy.max_interval={self.max_interval!r} is invalid: "
                f"must be >= min_interval={self.min_interval!r}"
            )

    def clamp(self, seconds: float) -> float:
        return min(self.max_interval, max(self.min_interval, seconds))

    def jittered(self, seconds: float, rng: random.Random) -> float:
        if not self.jitter:
            return seconds
        return seconds * rng.uniform(1 - self.jitter, 1 + self.jitter)

    def interval(self, age: float, expected: float) -> float:
        """The gap before the next poll of a task ``age`` seconds old, expected to take
        ``expected`` seconds: halve the distance to the expected end while before it, then
        widen slowly as the task overruns.
        """
        remaining = expected - age
        if remaining > 0:
            return self.clamp(remaining / 2)
        overrun = -remaining / expected if expected > 0 else 1.0
        return self.clamp(self.min_interval * (1 + overrun * 4))
