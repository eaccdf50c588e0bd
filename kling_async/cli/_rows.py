"""Where each row of a running batch stands, as the progress display and the summary see it."""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Iterable

import attrs

import kling_async as ka

from ._journal import JournalRow
from ._prompts import PromptRow

__all__ = ["GROUPS", "Phase", "RowState", "tally"]


class Phase(enum.StrEnum):
    WAITING = "waiting"  # queued behind the client's limits
    SUBMITTED = "submitted"
    PROCESSING = "processing"
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"  # the task failed
    REJECTED = "rejected"  # the request was refused
    ERROR = "error"  # stopped short (download, account, lost task): a rerun tries again
    CHANGED = "changed"  # differs from the journal: not sent
    ELSEWHERE = "elsewhere"  # another machine of a shared batch (--redis) holds it

    @property
    def is_final(self) -> bool:
        return self in _FINAL

    @property
    def group(self) -> str:
        return _GROUP[self]


#: Final for this run (ELSEWHERE too: another machine's work, unless it is taken over here).
_FINAL = frozenset(
    {Phase.DONE, Phase.FAILED, Phase.REJECTED, Phase.ERROR, Phase.CHANGED, Phase.ELSEWHERE}
)
_GROUP = {
    Phase.WAITING: "queued",
    Phase.SUBMITTED: "running",
    Phase.PROCESSING: "running",
    Phase.DOWNLOADING: "downloading",
    Phase.DONE: "done",
    Phase.FAILED: "failed",
    Phase.REJECTED: "failed",
    Phase.ERROR: "failed",
    Phase.CHANGED: "changed",
    Phase.ELSEWHERE: "elsewhere",
}
#: Display order of the groups.
GROUPS = ("done", "running", "downloading", "queued", "failed", "changed", "elsewhere")


@attrs.define
class RowState:
    """One row during a run: mutable, owned by the batch runner, read by the display."""

    row: PromptRow
    record: JournalRow
    phase: Phase
    since: float = attrs.field(factory=time.monotonic)
    task_id: str | None = None
    error: str | None = None
    #: The API's error code of the error that ended the row, where it had one (``1303``,
    #: ``"model_not_found"``).
    error_code: int | str | None = None
    job: ka.Job | None = None
    #: Finished before this run started (skipped, not counted in this run's speed).
    earlier: bool = False
    #: When this run started working on the row (monotonic), for the live view.
    active_since: float | None = None
    #: Its clip's download has started (a job's later events change nothing then).
    downloading: bool = False
    #: A shared batch: the machine that holds the row (when another one), and how the row
    #: ended there, as Redis said when last asked (None: not yet).
    machine: str | None = None
    machine_status: str | None = None

    def move(self, phase: Phase) -> bool:
        """Enter ``phase``; False if already there."""
        if phase is self.phase:
            return False
        self.phase = phase
        self.since = time.monotonic()
        if self.active_since is None and self.active:
            self.active_since = self.since
        return True

    @property
    def active(self) -> bool:
        return self.phase in (
            Phase.SUBMITTED,
            Phase.PROCESSING,
            Phase.DOWNLOADING,
        )


def tally(states: Iterable[RowState]) -> Counter[str]:
    """Rows per display group."""
    return Counter(state.phase.group for state in states)
