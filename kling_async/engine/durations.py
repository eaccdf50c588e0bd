"""The duration statistics seam: what each class of task has taken, for the poll schedule.

Tasks of one class (model, mode, clip length) take similar times; the pollers place each
task's polls where that class's completions are likely. :class:`DurationStats` is what the
engine needs of the statistics: the current model of a class (read on every poll, so it must
be cheap and local) and each completion measured by this client. :class:`LearnedDurations` is
the in-process default; a shared implementation (several workers on one account) keeps a local
model per class and merges every worker's completions into it.

**Across runs.** A new run learning a class from nothing polls its first wave of tasks on a
guess, and its first fits lean short (the first tasks to end are the quick ones). So what was
learned is kept: a job store that is also a :class:`DurationStore` (``MemoryJobStore``,
``SQLiteJobStore``: the batch tool's journal, the FastAPI integration's store) keeps one
:class:`~kling_async.protocol.schedule.DurationSummary` per class, which the client loads when
it opens and saves as it learns (:class:`DurationKeeper`); with Redis the account's completions
stream does the same for every worker. ``forget_durations()`` on the store is the reset.

**A class never seen** starts from the nearest class that has data, not from the one fixed
``initial_estimate``: the same model and mode at another clip length, else the same model at
another mode, else another model in the same mode, else any, its median scaled by the clip
lengths and modes (below) and its spread widened, worth only
:data:`~kling_async.protocol.schedule.PRIOR_WEIGHT` observations, so the class's own tasks
take over within a few ends. A class first polled while nothing was known borrows as soon as
another class has data (its prior is made again while it has none of its own).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import anyio
import attrs

from kling_async.protocol.poll import PollPolicy
from kling_async.protocol.schedule import ClassKey, DurationModel, DurationSummary

__all__ = [
    "DurationKeeper",
    "DurationStats",
    "DurationStore",
    "LearnedDurations",
    "borrowed_prior",
]

log = logging.getLogger("kling_async")

#: A longer clip takes longer, less than in proportion (rendering has a fixed part): the
#: median scales with (clip length ratio) ** this. 10 s against 5 s gives about 1.5x.
CLIP_EXPONENT = 0.6
#: Pro mode against std: 1.6x. Both factors are estimates (public timings only say that pro
#: and 10 s clips are slower), which is all a borrowed prior needs: it only has to be nearer
#: than the one fixed guess, and (worth two observations) the class's own tasks soon replace it.
PRO_FACTOR = 1.6
#: Added (in quadrature) to a borrowed class's spread: the scaling is a guess.
BORROWED_SPREAD = 0.25
#: A loaded class counts as at most this many observations, so this run's own tasks can still
#: move a model that many earlier runs filled.
LOADED_WEIGHT_CAP = 200


@runtime_checkable
class DurationStats(Protocol):
    """Per-class duration statistics (see the module docstring).

    ``model(key)`` is the model the schedule reads for a class (created from the poll policy's
    prior for a class never seen); ``observe(key, seconds)`` records a task of the class that
    was measured from its submission to its end.
    """

    def model(self, key: ClassKey) -> DurationModel: ...

    def observe(self, key: ClassKey, seconds: float) -> None: ...


@runtime_checkable
class DurationStore(Protocol):
    """Where a client keeps what it learned of each class between runs (a job store may be
    one): the summaries it saved last, loaded when a client opens; ``forget_durations`` is the
    reset (the next client starts from the poll policy's prior again)."""

    async def load_durations(self) -> dict[ClassKey, DurationSummary]: ...

    async def save_durations(self, summaries: Mapping[ClassKey, DurationSummary]) -> None: ...

    async def forget_durations(self) -> None: ...


def _clip_seconds(key: ClassKey) -> float | None:
    try:
        seconds = float(key[2])
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _mode_factor(mode: str) -> float:
    return PRO_FACTOR if mode == "pro" else 1.0


def borrowed_prior(key: ClassKey, known: Mapping[ClassKey, DurationModel]) -> tuple[float, float]:
    """(median, sigma) for a class never seen, from the nearest class in ``known`` that has
    observations: the same model and mode first, then the same model, then another model in
    the same mode, then any; within one, the nearest clip length, then the most
    observations. Raises ``LookupError`` if none has."""
    model_name, mode, _ = key
    seconds = _clip_seconds(key)

    def rank(candidate: ClassKey) -> tuple[int, float, int]:
        if candidate[0] == model_name:
            tier = 0 if candidate[1] == mode else 1
        else:
            tier = 2 if candidate[1] == mode else 3
        theirs = _clip_seconds(candidate)
        distance = (
            abs(math.log(seconds / theirs)) if seconds is not None and theirs is not None else 9.0
        )
        return tier, distance, -known[candidate].count

    candidates = [k for k, m in known.items() if m.count > 0 and k != key]
    if not candidates:
        raise LookupError(key)
    nearest = min(candidates, key=rank)
    median, sigma = known[nearest].fit()
    theirs = _clip_seconds(nearest)
    if seconds is not None and theirs is not None:
        median *= (seconds / theirs) ** CLIP_EXPONENT
    median *= _mode_factor(mode) / _mode_factor(nearest[1])
    return median, math.sqrt(sigma**2 + BORROWED_SPREAD**2)


class LearnedDurations:
    """Learns each class's durations in memory, from the tasks this client measures, starting
    from what earlier runs learned (``known``, see :meth:`load`)."""

    def __init__(
        self, policy: PollPolicy, known: Mapping[ClassKey, DurationSummary] | None = None
    ) -> None:
        self._policy = policy
        self._models: dict[ClassKey, DurationModel] = {}
        #: Grows with every observation and load: a keeper saves when it moved.
        self.version = 0
        #: Grows when what a class could borrow from moved: a class gained its first
        #: observations, or its count reached a power of two (its fit has settled a step).
        self._neighbours = 0
        #: For each class with no observations yet, ``_neighbours`` when its prior was made.
        self._borrowed: dict[ClassKey, int] = {}
        if known:
            self.load(known)

    def model(self, key: ClassKey) -> DurationModel:
        model = self._models.get(key)
        if model is None or (model.count == 0 and self._borrowed.get(key) != self._neighbours):
            # A class with no data is made again once the others moved: one first polled
            # while nothing was known (a mixed first batch) borrows as soon as a class ends,
            # instead of keeping the fixed guess until its own first task ends.
            model = self._models[key] = self._new_model(key)
            self._borrowed[key] = self._neighbours
        return model

    def _new_model(self, key: ClassKey) -> DurationModel:
        model = self._policy.duration_model()
        try:
            median, sigma = borrowed_prior(key, self._models)
        except LookupError:
            return model  # nothing known: the policy's initial estimate
        return attrs.evolve(model, prior_median=median, prior_sigma=sigma)

    def observe(self, key: ClassKey, seconds: float) -> None:
        model = self.model(key)
        model.observe(seconds)
        self.version += 1
        if model.count & (model.count - 1) == 0:  # 1, 2, 4, 8, ...: worth borrowing anew
            self._neighbours += 1

    def load(self, summaries: Mapping[ClassKey, DurationSummary]) -> None:
        """Start each class from a summary an earlier run saved (worth at most
        :data:`LOADED_WEIGHT_CAP` observations). A class already learned here keeps its own
        observations and gains the loaded ones. A class new here starts from the policy's
        prior, whatever else is loaded (so it fits as the run that saved it did, whatever
        the order of the summaries)."""
        for key, summary in summaries.items():
            if summary.count:
                model = self._models.get(key)
                if model is None or model.count == 0:
                    model = self._models[key] = self._policy.duration_model()
                model.absorb(summary.capped(LOADED_WEIGHT_CAP))
        self.version += 1
        self._neighbours += 1

    def summaries(self) -> dict[ClassKey, DurationSummary]:
        """Every class with observations, for a store to keep."""
        return {key: m.summary() for key, m in self._models.items() if m.count > 0}

    def reset(self) -> None:
        """Forget every class (each starts again from the policy's prior)."""
        self._models.clear()
        self._borrowed.clear()
        self.version += 1
        self._neighbours += 1


#: Seconds between two saves while the statistics move: a crash loses at most this much.
SAVE_PERIOD = 10.0


class DurationKeeper:
    """Loads a client's :class:`LearnedDurations` from a :class:`DurationStore` when it
    opens, saves them in the client's task group as they move (at most every
    :data:`SAVE_PERIOD` seconds, never in a poller's way), and once more when it closes. A
    store that cannot load or save is logged and tried again later: statistics only make
    polls cheaper, so they never stop a client."""

    def __init__(self, stats: LearnedDurations, store: DurationStore) -> None:
        self.stats = stats
        self.store = store
        self._saved = -1

    async def load(self) -> None:
        try:
            summaries = await self.store.load_durations()
        except Exception as exc:
            log.warning("learned durations could not be loaded (%s); learning afresh", exc)
            return
        self.stats.load(summaries)
        self._saved = self.stats.version

    async def run(self) -> None:
        while True:
            await anyio.sleep(SAVE_PERIOD)
            await self.save()

    async def forget(self) -> None:
        """The store forgets (the statistics were reset by the caller): nothing to save."""
        await self.store.forget_durations()
        self._saved = self.stats.version

    async def save(self) -> None:
        version = self.stats.version
        if version == self._saved:
            return
        try:
            await self.store.save_durations(self.stats.summaries())
        except Exception as exc:
            log.warning("learned durations could not be saved (%s); trying again later", exc)
            return
        self._saved = version
