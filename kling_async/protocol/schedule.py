"""Poll schedules: when to look at a task, given what tasks of its kind have taken.

A task's duration is unknown but not arbitrary: tasks of one class (model, mode, clip length)
take similar times, roughly log-normally spread. Given that distribution, choosing poll times
is the classic *inspection schedule* problem (Barlow, Hunter and Proschan): each poll costs
one request, each second between completion and the next poll costs detection lag. We solve
it by dynamic programming on a grid, once per class and again as the estimate sharpens, and
every poll of every task of the class then costs one binary search.

Pure arithmetic, no IO: :class:`DurationModel` learns, :func:`inspection_schedule` plans.
"""

from __future__ import annotations

import bisect
import math

import attrs

__all__ = ["ClassKey", "DurationModel", "DurationSummary", "inspection_schedule"]

ClassKey = tuple[str, str, str]

#: Log-space spread assumed before a class has data: wide, so early polls cover a range.
PRIOR_SIGMA = 0.5
#: How many observations the prior is worth when blended with real ones.
PRIOR_WEIGHT = 2.0
_MIN_SIGMA = 0.05
_GRID_POINTS = 360
_HORIZON_SIGMAS = 3.5


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def inspection_schedule(
    median: float,
    sigma: float,
    *,
    lag_per_poll: float,
    min_interval: float,
    max_interval: float,
) -> tuple[float, ...]:
    """Poll ages (seconds since submission) for a log-normal(``median``, ``sigma``) duration.

    Minimises E[polls] + E[lag] / ``lag_per_poll``: a poll is worth spending when it cuts the
    expected detection lag by more than ``lag_per_poll`` seconds. Gaps stay within
    [``min_interval``, ``max_interval``]. The schedule covers the distribution up to its
    ~99.98th percentile; past the end, callers poll every ``max_interval``.
    """
    mu = math.log(median)
    sigma = max(sigma, _MIN_SIGMA)
    horizon = math.exp(mu + _HORIZON_SIGMAS * sigma)
    step = max(horizon / _GRID_POINTS, min_interval / 4)
    n = int(horizon / step) + 1
    ages = [i * step for i in range(n + 1)]
    survival = [1.0] + [1.0 - _normal_cdf((math.log(t) - mu) / sigma) for t in ages[1:]]
    # partial[i] = E[d; d <= ages[i]], by the midpoint rule on each cell.
    partial = [0.0] * (n + 1)
    for i in range(1, n + 1):
        partial[i] = partial[i - 1] + (survival[i - 1] - survival[i]) * (ages[i] + ages[i - 1]) / 2
    weight = 1.0 / lag_per_poll
    lo = max(1, round(min_interval / step))
    hi = max(lo, round(max_interval / step))
    cost = [0.0] * (n + 1)
    choice = [n] * (n + 1)
    # cost[i]: expected future cost given a poll at ages[i] (in absolute probability mass):
    # the next poll at j is paid if the task is still running at i (survival[i]), and tasks
    # ending in (i, j] wait until ages[j]: lag mass (S_i - S_j) * t_j - (partial_j - partial_i).
    for i in range(n, -1, -1):
        if survival[i] < 1e-7 or i + lo > n:
            cost[i] = survival[i]
            choice[i] = min(n, i + hi)
            continue
        best = math.inf
        best_j = n
        s_i, p_i = survival[i], partial[i]
        for j in range(i + lo, min(n, i + hi) + 1):
            c = s_i + weight * ((s_i - survival[j]) * ages[j] - (partial[j] - p_i)) + cost[j]
            if c < best:
                best, best_j = c, j
        cost[i], choice[i] = best, best_j
    plan: list[float] = []
    i = 0
    while i < n:
        i = choice[i]
        plan.append(ages[i])
    return tuple(plan)


def _finite(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"DurationSummary.{attribute.name}={value!r} is invalid: must be finite")


def _nonnegative(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"DurationSummary.{attribute.name}={value!r} is invalid: must be >= 0")


def _count(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"DurationSummary.{attribute.name}={value!r} is invalid: must be an int >= 0"
        )


@attrs.frozen
class DurationSummary:
    """What a class's durations came to, in the log space the model fits: how many were
    measured, their mean and their variance. Enough to rebuild the model's fit exactly, so a
    store keeps three numbers per class, not every duration."""

    count: int = attrs.field(validator=_count)
    mean_log: float = attrs.field(validator=_finite)
    var_log: float = attrs.field(validator=[_finite, _nonnegative])

    def to_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean_log": self.mean_log, "var_log": self.var_log}

    @classmethod
    def from_dict(cls, data: object) -> DurationSummary:
        """The inverse of :meth:`to_dict`; anything else (stored data is untrusted) raises
        ``ValueError`` naming the field."""
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ValueError(f"a duration summary must be a mapping, not {kind}")  # noqa: TRY004
        try:
            return cls(data["count"], float(data["mean_log"]), float(data["var_log"]))
        except KeyError as exc:
            raise ValueError(f"a duration summary lacks {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ValueError(f"a duration summary is malformed: {exc}") from None

    def capped(self, count: int) -> DurationSummary:
        """The same fit, worth at most ``count`` observations: what a new run starts from,
        so its own tasks can still move a model that earlier runs filled (durations drift)."""
        return self if self.count <= count else attrs.evolve(self, count=count)


@attrs.define
class DurationModel:
    """What one class of tasks has taken so far, as a log-normal fit blended with a prior.

    Durations are measured locally (submission to the midpoint of the last two polls), never
    from server timestamps, so clock skew between client and server cannot mislead it.
    """

    prior_median: float
    lag_per_poll: float
    min_interval: float
    max_interval: float
    count: int = 0
    _sum: float = 0.0
    _sum_sq: float = 0.0
    _plan: tuple[float, ...] = ()
    _planned_at: int = -1
    #: The log-space spread assumed before data (wider for a prior borrowed from a neighbour).
    prior_sigma: float = attrs.field(default=PRIOR_SIGMA, kw_only=True)

    def observe(self, duration: float) -> None:
        if duration > 0 and math.isfinite(duration):
            log_d = math.log(duration)
            self.count += 1
            self._sum += log_d
            self._sum_sq += log_d * log_d

    def fit(self) -> tuple[float, float]:
        """(median, sigma): the prior pulled towards the data as observations accumulate."""
        prior_mu = math.log(self.prior_median)
        n, w = self.count, PRIOR_WEIGHT
        mu = (w * prior_mu + self._sum) / (w + n)
        if n == 0:
            return self.prior_median, self.prior_sigma
        mean = self._sum / n
        var = max(0.0, self._sum_sq / n - mean * mean)
        # Prior variance around the prior median, plus the data's spread and its offset.
        blended = (w * self.prior_sigma**2 + n * var + w * n / (w + n) * (mean - prior_mu) ** 2) / (
            w + n
        )
        return math.exp(mu), max(_MIN_SIGMA, math.sqrt(blended))

    def summary(self) -> DurationSummary:
        """The observations so far, as :class:`DurationSummary` (for a store to keep)."""
        if self.count == 0:
            return DurationSummary(0, 0.0, 0.0)
        mean = self._sum / self.count
        return DurationSummary(self.count, mean, max(0.0, self._sum_sq / self.count - mean**2))

    def absorb(self, summary: DurationSummary) -> None:
        """Add ``summary``'s observations, as if each had been observed here: a model of no
        observations that absorbs a summary fits exactly as the model that made it did."""
        if summary.count:
            self.count += summary.count
            self._sum += summary.count * summary.mean_log
            self._sum_sq += summary.count * (summary.var_log + summary.mean_log**2)

    def _stale(self) -> bool:
        # Replan at 0, 1, 2, 4, 8, ... observations, then every 64: cheap and converges fast.
        if self._planned_at < 0:
            return True
        grown = self.count - self._planned_at
        return grown > 0 and (self.count & (self.count - 1) == 0 or grown >= 64)

    def plan(self) -> tuple[float, ...]:
        if self._stale():
            median, sigma = self.fit()
            self._plan = inspection_schedule(
                median,
                sigma,
                lag_per_poll=self.lag_per_poll,
                min_interval=self.min_interval,
                max_interval=self.max_interval,
            )
            self._planned_at = self.count
        return self._plan

    def next_age(self, age: float) -> float:
        """The age at which a task now ``age`` seconds old should next be polled."""
        plan = self.plan()
        k = bisect.bisect_right(plan, age + self.min_interval * 0.5)
        if k < len(plan):
            # The grid of a very wide class can be coarser than max_interval: never wait longer.
            return min(max(plan[k], age + self.min_interval), age + self.max_interval)
        last = plan[-1] if plan else 0.0
        overrun = max(0.0, age - last)
        return age + min(self.max_interval, max(self.min_interval, overrun / 2))
