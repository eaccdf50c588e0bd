"""The duration statistics seam: what each class of task has taken, for the poll schedule.

Tasks of one class (model, mode, clip length) take similar times; the pollers place each
task's polls where that class's completions are likely. :class:`DurationStats` is what the
engine needs of the statistics: the current model of a class (read on every poll, so it must
be cheap and local) and each completion measured by this client. :class:`LearnedDurations` is
the in-process default; a shared implementation (several workers on one account) keeps a local
model per class and merges every worker's completions into it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kling_async.protocol.poll import PollPolicy
from kling_async.protocol.schedule import ClassKey, DurationModel

__all__ = ["DurationStats", "LearnedDurations"]


@runtime_checkable
class DurationStats(Protocol):
    """Per-class duration statistics (see the module docstring).

    ``model(key)`` is the model the schedule reads for a class (created from the poll policy's
    prior for a class never seen); ``observe(key, seconds)`` records a task of the class that
    was measured from its submission to its end.
    """

    def model(self, key: ClassKey) -> DurationModel: ...

    def observe(self, key: ClassKey, seconds: float) -> None: ...


class LearnedDurations:
    """Learns each class's durations in memory, from the tasks this client measures."""

    def __init__(self, policy: PollPolicy) -> None:
        self._policy = policy
        self._models: dict[ClassKey, DurationModel] = {}

    def model(self, key: ClassKey) -> DurationModel:
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = self._policy.duration_model()
        return model

    def observe(self, key: ClassKey, seconds: float) -> None:
        self.model(key).observe(seconds)
