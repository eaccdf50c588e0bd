"""Tasks, their lifecycle, and the ground truth the emulator keeps about them.

A task's whole future is drawn when it is created (duration, outcome, video ids) from one seeded
random stream, so the same seed and the same sequence of creates give the same tasks. Its status
is then *derived* from the emulated clock on demand (:meth:`EmulatedTask.status_at`): there is
no timer per task, and 100,000 tasks cost a dict entry and a heap entry each.
"""

from __future__ import annotations

import heapq
import math
import random
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal

import attrs

Outcome = Literal["succeed", "failed"]
Status = Literal["submitted", "processing", "succeed", "failed"]

FAILURE_MESSAGE: Final = "Video generation failed"


@attrs.frozen
class EmulatedVideo:
    """One result video: its id and the duration string the API reports (e.g. ``"5.1"``)."""

    id: str
    duration: str


@attrs.frozen
class EmulatedTask:
    """Everything the emulator decided about a task when it was created.

    Times are emulated seconds since the emulator started (negative for a task loaded from a
    state file that was created before this emulator started). The status at any instant
    follows: ``submitted`` until ``started_at``, ``processing`` until ``completes_at``, then
    ``outcome``. ``visible_at`` is when lookups by ``external_task_id`` and the list start to see
    it (``created_at`` plus the visibility lag in force at its creation); a GET by task id sees
    it at once.
    """

    task_id: str
    external_task_id: str | None
    model_name: str
    mode: str
    duration: str
    aspect_ratio: str
    callback_url: str | None
    created_at: float
    started_at: float
    completes_at: float
    outcome: Outcome
    failure_message: str
    videos: tuple[EmulatedVideo, ...]
    final_unit_deduction: str
    request: Mapping[str, Any] = attrs.field(repr=False, eq=False)
    """The create body as received (unknown extra fields included), for tests to inspect."""
    visible_at: float = attrs.field(
        default=attrs.Factory(lambda self: self.created_at, takes_self=True)
    )

    @property
    def video_ids(self) -> tuple[str, ...]:
        return tuple(video.id for video in self.videos)

    def status_at(self, t: float) -> Status:
        """The task status at emulated time ``t``."""
        if t < self.started_at:
            return "submitted"
        if t < self.completes_at:
            return "processing"
        return self.outcome

    def changed_at(self, t: float) -> float:
        """When the status seen at ``t`` began (what ``updated_at`` reports)."""
        if t < self.started_at:
            return self.created_at
        if t < self.completes_at:
            return self.started_at
        return self.completes_at

    def is_active(self, t: float) -> bool:
        """Whether the task holds one of the account's parallel slots at ``t``."""
        return self.created_at <= t < self.completes_at

    def is_visible(self, t: float) -> bool:
        """Whether lookups by external id and the list see the task at ``t``."""
        return t >= self.visible_at


@attrs.frozen
class Lifecycle:
    """How long tasks take and how often they fail.

    Durations are log-normal around ``median_duration`` (emulated seconds, std mode, 5 s clip):
    the shape real tasks show (most near the median, a long tail). ``pro`` mode multiplies by
    ``pro_factor``; a clip of ``n`` seconds multiplies by ``long_factor ** ((n - 5) / 5)``, which
    is exactly ``long_factor`` for the ``"10"`` second clips and stays monotonic for kling-v3's
    3..15 s range.
    """

    median_duration: float = 90.0
    duration_sigma: float = 0.35
    pro_factor: float = 1.6
    long_factor: float = 1.5
    queue_fraction: float = 0.1
    failure_rate: float = 0.0

    def __attrs_post_init__(self) -> None:
        for name in ("median_duration", "duration_sigma", "pro_factor", "long_factor"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("pro_factor", "long_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("queue_fraction", "failure_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")

    def median_for(self, mode: str, clip_seconds: int) -> float:
        """The median duration of a task class, before the log-normal draw."""
        factor = self.pro_factor if mode == "pro" else 1.0
        factor *= math.pow(self.long_factor, (clip_seconds - 5) / 5)
        return self.median_duration * factor


@attrs.define
class EmulatorStats:
    """Ground truth about what the emulator served. A live object: it changes as requests arrive.

    ``requests_per_route`` counts every request that reached a route, whatever it was answered
    (routes: ``create``, ``get``, ``get_by_external_id``, ``list``, ``download``, and
    ``callback_sent`` for callback POSTs attempted). ``sent_errors`` counts Kling-envelope error
    answers by code; ``faults_injected`` counts injected faults by :class:`FaultKind` name.
    ``download_head`` counts HEAD requests for files (which draw no faults).

    With a state file (``Emulator(state_path=...)``), ``tasks_created`` and
    ``created_per_external_id`` count the tasks loaded from it too: they are the account's
    ground truth, and a test that restarts the emulator asks what the account holds, not what
    this process happened to create. The other counters start at zero in each process.
    """

    tasks_created: int = 0
    created_per_external_id: Counter[str] = attrs.field(factory=Counter)
    requests_per_route: Counter[str] = attrs.field(factory=Counter)
    peak_active: int = 0
    sent_1303: int = 0
    sent_1302: int = 0
    sent_errors: Counter[int] = attrs.field(factory=Counter)
    faults_injected: Counter[str] = attrs.field(factory=Counter)
    tokens_seen: int = 0
    callbacks_failed: int = 0
    callbacks_skipped: int = 0


def _unit_deduction(mode: str, clip_seconds: int) -> str:
    units = (3.5 if mode == "pro" else 1.0) * clip_seconds / 5
    return f"{units:g}"


class TaskStore:
    """The account's tasks: creation (with seeded draws), lookups, paging and slot counting.

    ``stream`` picks the random stream: 0 is ``random.Random(seed)`` (what a run without a state
    file uses, so seeded runs stay as they were); a restart on a state file uses its session
    number, so it draws new task and video ids instead of replaying the first session's.

    Two things hide a task from lookups: its ``visible_at`` (the visibility lag) and not being
    durable yet (``unsaved``: created, but its state-file write not yet synced). Uniqueness of
    ``external_task_id`` is enforced at write, so :meth:`by_external_id` sees every task.
    """

    def __init__(self, *, seed: int, lifecycle: Lifecycle, stream: int = 0) -> None:
        self._rng = random.Random(seed if stream == 0 else f"kling-emulator-tasks:{seed}:{stream}")
        self._lifecycle = lifecycle
        self.tasks: dict[str, EmulatedTask] = {}
        self._by_external_id: dict[str, str] = {}
        # Later tasks with an already used external id (duplicate_external_id="allow"): rare.
        self._more_by_external_id: dict[str, list[str]] = {}
        self._order: list[str] = []  # creation order, for the newest-first list
        self._completions: list[float] = []  # min-heap of completes_at of maybe-active tasks
        self._video_owner: dict[str, str] = {}
        self.unsaved: set[str] = set()
        # The largest visible_at - created_at of any task: older tasks are surely visible.
        self._max_lag = 0.0

    def __len__(self) -> int:
        return len(self._order)

    @property
    def lifecycle(self) -> Lifecycle:
        """How tasks created from now on are drawn (tasks already created keep their future)."""
        return self._lifecycle

    @lifecycle.setter
    def lifecycle(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    def by_external_id(self, external_task_id: str) -> EmulatedTask | None:
        """The first task created with this external id, visible or not (for uniqueness)."""
        task_id = self._by_external_id.get(external_task_id)
        return None if task_id is None else self.tasks[task_id]

    def visible(self, task: EmulatedTask, now: float) -> bool:
        """Whether lookups by external id and the list see ``task`` at ``now``."""
        return task.is_visible(now) and task.task_id not in self.unsaved

    def get(self, task_id: str) -> EmulatedTask | None:
        """The task a GET by task id finds: any durable task, whatever its visibility lag."""
        if task_id in self.unsaved:
            return None
        return self.tasks.get(task_id)

    def find_external(self, external_task_id: str, now: float) -> EmulatedTask | None:
        """The first task with this external id that lookups see at ``now``."""
        first = self.by_external_id(external_task_id)
        if first is None:
            return None
        if self.visible(first, now):
            return first
        for task_id in self._more_by_external_id.get(external_task_id, ()):
            task = self.tasks[task_id]
            if self.visible(task, now):
                return task
        return None

    def video_owner(self, video_id: str) -> EmulatedTask | None:
        task_id = self._video_owner.get(video_id)
        return None if task_id is None else self.tasks[task_id]

    def active_count(self, now: float) -> int:
        """Tasks created and not yet completed at ``now`` (amortised O(log n))."""
        heap = self._completions
        while heap and heap[0] <= now:
            heapq.heappop(heap)
        return len(heap)

    def newest_first(
        self, page_num: int, page_size: int, now: float | None = None
    ) -> Iterator[EmulatedTask]:
        """One page of the list endpoint: newest task first, pages numbered from 1.

        With ``now``, only the tasks visible then are listed. Creation order is time order, so
        only the tail of tasks younger than the largest lag ever used (or not yet durable) can
        hide anything: that tail is filtered, the rest is paged by index. Without a lag a page
        costs what it did before, whatever the number of tasks.
        """
        order, tasks = self._order, self.tasks
        boundary = len(order)
        tail: list[EmulatedTask] = []
        if now is not None:
            while boundary > 0:
                task = tasks[order[boundary - 1]]
                if task.created_at + self._max_lag <= now and task.task_id not in self.unsaved:
                    break
                if self.visible(task, now):
                    tail.append(task)
                boundary -= 1
        skip = (page_num - 1) * page_size
        yield from tail[skip : skip + page_size]
        remaining = page_size - max(0, min(page_size, len(tail) - skip))
        start = boundary - 1 - max(0, skip - len(tail))
        stop = max(start - remaining, -1)
        for index in range(start, stop, -1):
            yield tasks[order[index]]

    def create(
        self,
        *,
        now: float,
        model_name: str,
        mode: str,
        duration: str,
        aspect_ratio: str,
        external_task_id: str | None,
        callback_url: str | None,
        request: Mapping[str, Any],
        visibility_lag: float = 0.0,
    ) -> EmulatedTask:
        """Draw a task's future and store it.

        Every task consumes the same number of draws whatever its outcome, so task ``k`` of a run
        gets the same duration and outcome for the same seed and the same task class.
        """
        rng = self._rng
        task_id = str(rng.randrange(10**17, 10**18))
        while task_id in self.tasks:
            task_id = str(rng.randrange(10**17, 10**18))
        z = rng.gauss(0.0, 1.0)
        fails = rng.random() < self._lifecycle.failure_rate
        video_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        while video_id in self._video_owner:  # only after a restart on a state file, if ever
            video_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        tenths = 1 + rng.randrange(3)

        clip_seconds = int(duration)
        lifecycle = self._lifecycle
        total = lifecycle.median_for(mode, clip_seconds) * math.exp(lifecycle.duration_sigma * z)
        videos = () if fails else (EmulatedVideo(video_id, f"{clip_seconds}.{tenths}"),)
        task = EmulatedTask(
            task_id=task_id,
            external_task_id=external_task_id,
            model_name=model_name,
            mode=mode,
            duration=duration,
            aspect_ratio=aspect_ratio,
            callback_url=callback_url,
            created_at=now,
            started_at=now + lifecycle.queue_fraction * total,
            completes_at=now + total,
            outcome="failed" if fails else "succeed",
            failure_message=FAILURE_MESSAGE if fails else "",
            videos=videos,
            final_unit_deduction=_unit_deduction(mode, clip_seconds),
            request={sys.intern(key): value for key, value in request.items()},
            visible_at=now + visibility_lag,
        )
        self.add(task)
        return task

    def add(self, task: EmulatedTask) -> None:
        """Store a task (a new one, or one loaded from a state file, in creation order)."""
        task_id = task.task_id
        if task_id in self.tasks:
            raise ValueError(f"task {task_id} is already stored")
        self.tasks[task_id] = task
        self._order.append(task_id)
        external_task_id = task.external_task_id
        if external_task_id is not None:
            if external_task_id in self._by_external_id:
                self._more_by_external_id.setdefault(external_task_id, []).append(task_id)
            else:
                self._by_external_id[external_task_id] = task_id
        for video in task.videos:
            self._video_owner[video.id] = task_id
        self._max_lag = max(self._max_lag, task.visible_at - task.created_at)
        heapq.heappush(self._completions, task.completes_at)
