"""When to poll a task next.

Tasks take minutes and the client pays per request, so polling at a fixed short interval
wastes requests early and a long one adds lag late. :class:`PollPolicy` holds the bounds;
:mod:`kling_async.protocol.schedule` turns them and the durations seen so far into poll times.
"""

from __future__ import annotations

import random

import attrs

from kling_async.protocol.schedule import DurationModel

__all__ = ["PollPolicy"]


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"PollPolicy.{attribute.name}={value!r} is invalid: must be > 0")


#: About every 2 s: a freed slot is taken about a second after its task ends, for one or two
#: refused creates per task (see ``engine.limits``).
_PROBE_INTERVAL: float | None = 2.0


def _positive_or_none(
    inst: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"PollPolicy.{attribute.name}={value!r} is invalid: must be > 0")


@attrs.frozen(kw_only=True)
class PollPolicy:
    """How to poll tasks, in seconds.

    ``min_interval`` and ``max_interval`` bound the gap between two polls of one task;
    ``initial_estimate`` is the duration assumed for a class of task (model, mode, clip length)
    never seen yet. The client learns each class's durations and polls where completions are
    likely (``protocol.schedule``); ``lag_per_poll`` sets the trade: one more poll is spent only
    where it cuts the expected detection lag by more than that many seconds (default
    ``min_interval / 5``: about the mean lag of polling every 6 s, at well under its polls).
    The defaults suit real Kling, where tasks take minutes; against a time-scaled emulator,
    scale every value by the emulator's ``time_scale``. ``jitter`` is the +/- fraction applied
    to each gap so tasks submitted together do not poll in lockstep (a few percent is enough
    for that; more moves polls off the planned ages and costs polls at equal lag).

    ``safety_interval`` is the gap between polls of a task whose callbacks arrive (push
    delivery): each callback that claims an end is confirmed at once, so polls are only a
    safety net in case the callback that matters is lost.

    ``probe_interval``: while jobs wait for a slot at a limit the account has shown (a 1303),
    the next create goes out this often anyway (None: never). A task ends on the server a
    detection lag before a poll sees it; the probe finds its slot free at once instead, and a
    refused one (1303) creates nothing and costs one request of the budget. Not sent while
    callbacks report every end, and never past a ``max_active_tasks`` the user set.
    """

    min_interval: float = attrs.field(default=2.0, validator=_positive)
    max_interval: float = attrs.field(default=60.0, validator=_positive)
    initial_estimate: float = attrs.field(default=90.0, validator=_positive)
    jitter: float = attrs.field(
        default=0.03, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)]
    )
    lag_per_poll: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    safety_interval: float = attrs.field(default=300.0, validator=_positive)
    probe_interval: float | None = attrs.field(default=_PROBE_INTERVAL, validator=_positive_or_none)

    @property
    def effective_lag_per_poll(self) -> float:
        return self.lag_per_poll if self.lag_per_poll is not None else self.min_interval / 5

    def scaled(self, factor: float) -> PollPolicy:
        """The same policy with every duration multiplied by ``factor`` (for scaled clocks)."""
        return attrs.evolve(
            self,
            min_interval=self.min_interval * factor,
            max_interval=self.max_interval * factor,
            initial_estimate=self.initial_estimate * factor,
            lag_per_poll=self.effective_lag_per_poll * factor,
            safety_interval=self.safety_interval * factor,
            probe_interval=None if self.probe_interval is None else self.probe_interval * factor,
        )

    def __attrs_post_init__(self) -> None:
        if self.max_interval < self.min_interval:
            raise ValueError(
                f"PollPolicy.max_interval={self.max_interval!r} is invalid: "
                f"must be >= min_interval={self.min_interval!r}"
            )

    def jittered(self, seconds: float, rng: random.Random) -> float:
        if not self.jitter:
            return seconds
        return seconds * rng.uniform(1 - self.jitter, 1 + self.jitter)

    def duration_model(self) -> DurationModel:
        """A fresh learner for one class of tasks, starting from ``initial_estimate``."""
        return DurationModel(
            prior_median=self.initial_estimate,
            lag_per_poll=self.effective_lag_per_poll,
            min_interval=self.min_interval,
            max_interval=self.max_interval,
        )
