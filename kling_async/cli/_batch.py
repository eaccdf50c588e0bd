"""The batch runner: journal rows in, the engine in the middle, files and journal updates out.

All the hard parts (limits, exactly-once creates, polling) belong to :class:`KlingClient`;
and the journal is the client's job store (:class:`~._jobs.BatchJobs`): the client resumes
every job of the batch's rows when it opens (a row's job id is its ``external_task_id``), so
this module only reaches each row's job and writes down what is the batch's:

* a row still to do: ``kling.job(id)``, the job the client resumed from the journal (created
  directly if it was never sent, looked up first if it may have been, followed by its task id
  if it has one, a finished task included, so a clip is fetched from its current URL); one
  that ended with no task (an account error, an unreachable host) or that the store did not
  have: ``kling.submit(request, resume=True)``, which queues it again under the same id and
  looks it up before creating;
* a done row (file present, same SHA-256), a failed or a rejected row: skipped.

Every job reports through ``kling.events()`` (and, for what happened before the runner
listened, through the job's state when it is reached). The job's own state (task id, status)
is the engine's to record in the job store; the batch's (its verdict, the file, its sha256,
its error in the batch's words, its times) becomes a journal update, grouped with others into
one transaction by :class:`JournalWriter` so the event loop never waits on the disk.

An account-level error (a rejected key, arrears) stops every submission: it is said once, when
it happens, and the rows it kept from being sent are counted, not listed one by one.

A batch shared through Redis (``--redis``, see :mod:`._shared`) reaches only the rows this
machine holds: those it held already (a rerun), those it claims as its own rows leave the
queue (while fewer than :data:`CLAIM_AHEAD` wait for a slot), and those it takes over from a
machine that died or left. The others are ``elsewhere``. It ends once nothing is left to
claim or take over, its own rows have ended and no other live machine still works on rows;
each row it finishes (its clip in place, failed, rejected) is said in Redis at once.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import anyio
import anyio.abc
import attrs

import kling_async as ka

from ._files import PART_SUFFIX, disk_full_message, is_disk_full
from ._jobs import BatchJobs, job_record, write_failure
from ._journal import Journal, JournalRow, stored_request
from ._rows import Phase, RowState

if TYPE_CHECKING:
    from ._progress import Reporter
    from ._shared import Look, SharedBatch

__all__ = [
    "CLAIM_AHEAD",
    "BatchOutcome",
    "BatchRunner",
    "DownloadSettings",
    "JournalWriter",
    "remove_stale_parts",
    "verify_done",
]


#: How often the runner looks at the client's connection health.
_CONNECTION_CHECK_SECONDS = 0.5
#: A shared batch: a machine claims more rows while fewer than this many of its rows wait for
#: a slot, so the machines that get slots fastest take the most rows.
CLAIM_AHEAD: Final = 4
#: How a row that ended here is said in Redis (what is final for the whole batch).
_FINAL_STATUS: Final = {Phase.DONE: "done", Phase.FAILED: "failed", Phase.REJECTED: "rejected"}

_T = TypeVar("_T")


@attrs.frozen(kw_only=True)
class DownloadSettings:
    """``allowed_hosts`` and ``allow_private`` widen where result URLs may point (see
    :meth:`KlingClient.download`); ``timeout`` bounds each file, retries included."""

    max_bytes: int
    allowed_hosts: frozenset[str] | None = None
    allow_private: bool = False
    timeout: float = ka.DEFAULT_DOWNLOAD_TIMEOUT
    concurrency: int = 4
    retry: ka.RetryPolicy | None = None


@attrs.frozen
class BatchOutcome:
    """``fatal`` is the account-level error that stopped submissions, if one did;
    ``disk_full`` whether a clip could not be saved for want of space; ``unreachable`` the
    error that ended rows because the API host could not be reached, if one did."""

    states: tuple[RowState, ...]
    fatal: ka.KlingError | None
    disk_full: bool = False
    unreachable: ka.UnreachableError | None = None


def _sha256_of(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1024 * 1024), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _verified(out: Path, records: Sequence[JournalRow]) -> set[str]:
    """Keys of done rows whose file is present and hashes to what the journal recorded."""
    good = set()
    for record in records:
        path = out / record.file
        if record.size is not None and path.is_file() and path.stat().st_size != record.size:
            continue
        if record.sha256 is not None and _sha256_of(path) == record.sha256:
            good.add(record.key)
    return good


def remove_stale_parts(out: Path) -> int:
    """Delete temporary files a killed download left in ``out`` (ours only: ``.NNN-*.part``).

    Call it only while holding the journal lock, when no download of ours can be running.
    """
    removed = 0
    for path in out.glob(f".[0-9]*.mp4.*{PART_SUFFIX}"):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


class JournalWriter:
    """Buffers journal updates and writes them in one transaction at a time, in a worker
    thread; :meth:`flush` drains everything (the runner calls it, shielded, on the way out)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._pending: dict[str, dict[str, object]] = {}
        self._wake = anyio.Event()
        self._lock = anyio.Lock()

    def update(self, key: str, **changes: object) -> None:
        self._pending.setdefault(key, {}).update(changes)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    await anyio.to_thread.run_sync(self._journal.apply, batch)
                except BaseException as exc:
                    # Not written (a cancellation can land before the thread starts): keep
                    # the batch for the next flush, under anything newer for the same row.
                    for key, changes in batch.items():
                        self._pending[key] = {**changes, **self._pending.get(key, {})}
                    if isinstance(exc, Exception):
                        raise write_failure(self._journal, exc) from exc
                    raise


class BatchRunner:
    """Runs one batch with a client that is already open; see the module docstring."""

    def __init__(
        self,
        kling: ka.KlingClient,
        journal: Journal,
        jobs: BatchJobs,
        states: Sequence[RowState],
        *,
        out: Path,
        downloads: DownloadSettings,
        reporter: Reporter,
        share: SharedBatch | None = None,
    ) -> None:
        self._kling = kling
        self._journal = journal
        self._jobs = jobs
        self.states = tuple(states)
        self._out = out
        self._downloads = downloads
        self._reporter = reporter
        self._writer = JournalWriter(journal)
        self._by_job: dict[ka.Job, RowState] = {}
        #: Rows whose task ended in an earlier run: their download fetches the task first.
        self._refresh: set[str] = set()
        #: Keys of the rows this run works on and that have not ended yet.
        self._open: set[str] = set()
        self._finished = anyio.Event()
        self._download_slots = anyio.Semaphore(downloads.concurrency)
        self._task_group: anyio.abc.TaskGroup | None = None
        self.fatal: ka.KlingError | None = None
        #: Rows the account-level error kept from being sent (reported as one count).
        self._not_sent = 0
        self._disk_full = False
        #: Rows ended because the API host could not be reached (one line, one count).
        self.unreachable: ka.UnreachableError | None = None
        self._unreached = 0
        # A shared batch (see the module docstring).
        self._share = share
        self._by_key = {state.row.key: state for state in self.states}
        self._by_id = {state.record.external_task_id: state for state in self.states}
        #: Rows nobody held when last asked, in file order: claimed from the front.
        self._unclaimed: deque[RowState] = deque()
        self._poked = anyio.Event()
        #: Rows ended here, to say in Redis (row id -> done, failed or rejected).
        self._finals: dict[str, str] = {}
        self._finals_due = anyio.Event()
        self._redis_failing = False
        self._redis_failures = 0
        #: Rows taken over from machines that died or left.
        self.taken_over = 0

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> BatchOutcome:
        """Drive every row to an end (or until cancelled); the journal is flushed either way."""
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                task_group.start_soon(self._writer.run)
                await task_group.start(self._follow_events)
                self._reporter.attach(self.states, lambda: self._kling.stats)
                task_group.start_soon(self._reporter.run)
                task_group.start_soon(self._watch_connection)
                task_group.start_soon(self._watch_store)
                if self._share is None:
                    self._launch(self.states)
                else:
                    task_group.start_soon(self._jobs.run_mirror)
                    await self._share_start()
                    task_group.start_soon(self._heartbeats)
                    task_group.start_soon(self._tell_finals)
                    task_group.start_soon(self._share_loop)
                await self._finished.wait()
                task_group.cancel_scope.cancel()
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self._writer.flush()
                    if self._share is not None:
                        await self._jobs.flush_mirror()
                        with anyio.move_on_after(3.0):
                            await self._send_finals()
            finally:
                if self._not_sent:
                    rows = "row" if self._not_sent == 1 else "rows"
                    self._reporter.note(f"{self._not_sent} {rows} not sent: {self.fatal}")
                if self._unreached:
                    rows = "row" if self._unreached == 1 else "rows"
                    self._reporter.note(f"{self._unreached} {rows} stopped: {self.unreachable}")
                self._reporter.close()
        return BatchOutcome(self.states, self.fatal, self._disk_full, self.unreachable)

    async def _watch_connection(self) -> None:
        """Say within a second when the API host refuses every connect, and when it answers
        again: the client retries such failures on its own, and a person should not stare at
        a silent screen meanwhile."""
        failing = False
        limit = self._kling.unreachable_after
        give_up = f"giving up after {limit:g} s without an answer" if limit else "retrying"
        while True:
            stats = self._kling.stats
            if stats.connection_error is not None and not failing:
                failing = True
                self._reporter.note(
                    f"cannot reach {self._kling.host} ({stats.connection_error}); {give_up}"
                )
            elif stats.connection_error is None and failing:
                failing = False
                self._reporter.note(f"reached {self._kling.host} again")
            await anyio.sleep(_CONNECTION_CHECK_SECONDS)

    async def _watch_store(self) -> None:
        """Stop the run when the client's writes to the journal fail (see ``BatchJobs``)."""
        await self._jobs.failed.wait()
        assert self._jobs.failure is not None
        raise self._jobs.failure

    async def _follow_events(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        # started() does not yield, and events() subscribes before its first suspension: when
        # start() returns in run(), no job exists yet and no event can be missed.
        task_status.started()
        async for event in self._kling.events():
            state = self._by_job.get(event.job)
            if state is not None:
                self._on_event(state, event)

    def _launch(self, states: Iterable[RowState]) -> None:
        """Reach every row's job; called once ``events()`` listens, so what a job did before
        (the client resumed it when it opened) is read from the job and nothing is missed."""
        for state in states:
            if not state.phase.is_final:
                self._reach(state)
        if not self._open and self._share is None:
            self._finished.set()

    def _reach(self, state: RowState, *, fresh: bool = False) -> None:
        """Reach one row's job. ``fresh``: a shared batch's row claimed just now, which no
        machine ever held, so never sent: created without a lookup (unless Redis lost the
        batch's state, when a claim proves nothing)."""
        self._open.add(state.row.key)
        if state.record.status == "elsewhere":  # a shared batch's row, this machine's again
            self._writer.update(state.row.key, outcome=None)
            state.record = attrs.evolve(state.record, status="pending")
        job = self._kling.job(state.record.external_task_id)
        if job is None or (job.done and job.task_id is None):
            unsent = fresh and job is None and not (self._share and self._share.lookup_first)
            with warnings.catch_warnings():
                # Unknown model names were reported once when the file was read.
                warnings.simplefilter("ignore", ka.UnknownModelWarning)
                job = self._kling.submit(stored_request(state.record), resume=not unsent)
        elif job.status is ka.JobStatus.ERROR and job.task_id is not None:
            # Given up on with its task kept (the host was unreachable, polls failed):
            # the task is followed again.
            job = self._kling.track(job.task_id)
        elif job.done and job.task_id is not None:
            # Ended with its task in an earlier run, its clip not saved: the download
            # fetches the task first, for its current URL.
            self._refresh.add(state.row.key)
        self._watch(state, job)
        if job.task_id is not None:
            state.move(Phase.SUBMITTED)
        self._on_change(state, job, job.status, job.task)

    def _watch(self, state: RowState, job: ka.Job) -> None:
        state.job = job
        self._by_job[job] = state

    def _finish(self, state: RowState) -> None:
        self._open.discard(state.row.key)
        if self._share is not None:
            self._poke()
        elif not self._open:
            self._finished.set()

    # --- events -------------------------------------------------------------------------------

    def _on_event(self, state: RowState, event: ka.JobEvent) -> None:
        self._on_change(state, event.job, event.status, event.task)

    def _on_change(
        self, state: RowState, job: ka.Job, status: ka.JobStatus, task: ka.Task | None
    ) -> None:
        if self._share is not None and state.row.key in self._open:
            self._jobs.mirror(job_record(job))  # the client keeps its jobs in Redis
            self._poke()
        if state.phase.is_final or state.downloading:
            return  # said already (a job's state when reached, then its event)
        changes: dict[str, object] = {}
        if task is not None and state.task_id != task.task_id:
            state.task_id = task.task_id
            if state.record.submitted_at is None:
                # Our clock, not the task's created_at: the summary's seconds must not mix a
                # server's (or a time-scaled emulator's) clock with ours.
                submitted_at = time.time()
                changes["submitted_at"] = submitted_at
                state.record = attrs.evolve(state.record, submitted_at=submitted_at)
        key = state.row.key
        if status in (ka.JobStatus.SUBMITTED, ka.JobStatus.PROCESSING, ka.JobStatus.UNKNOWN):
            phase = Phase.PROCESSING if status is ka.JobStatus.PROCESSING else Phase.SUBMITTED
            if changes:
                self._writer.update(key, **changes)
            if state.move(phase):
                self._reporter.changed(state, f"{phase.value} (task {state.task_id})")
        elif status is ka.JobStatus.SUCCEEDED and task is not None:
            video = task.video
            changes.update(
                video_id=video.id if video else None,
                video_url=video.url if video else None,
            )
            self._writer.update(key, **changes)
            self._start_download(state, task)
        elif status is ka.JobStatus.FAILED and task is not None:
            reason = task.status_message or "the task failed (no reason given)"
            changes.update(error=reason, finished_at=time.time())
            self._writer.update(key, **changes)
            self._end(state, Phase.FAILED, reason)
        elif status is ka.JobStatus.ERROR:
            self._on_error(state, job.error, changes)

    def _on_error(
        self, state: RowState, error: BaseException | None, changes: dict[str, object]
    ) -> None:
        text = str(error) if error is not None else "the job ended without a result"
        changes["error"] = text
        state.error_code = error.code if isinstance(error, ka.APIError) else None
        phase = Phase.ERROR
        if self._jobs.failure is not None:
            # The journal cannot be written (said once, as the run stops): not a row's news.
            self._end(state, phase, text, quiet=True)
            return
        if isinstance(error, ka.AccountError | ka.AuthenticationError):
            if self.fatal is None:
                self.fatal = error
                self._reporter.note(f"stopping submissions: {error}")
            if state.task_id is None:
                # One cause for every row it stops: said once, counted at the end, and the
                # same words in the journal and the summary (which groups them).
                text = f"not sent: {self.fatal}"
                changes["error"] = text
                self._writer.update(state.row.key, **changes)
                self._not_sent += 1
                self._end(state, Phase.ERROR, text, quiet=True)
                return
        elif isinstance(error, ka.UnreachableError):
            if self.unreachable is None:
                self.unreachable = error
                self._reporter.note(f"giving up: {error}")
            # One cause for every row it ends: said once, counted at the end.
            text = f"stopped: {self.unreachable}"
            changes["error"] = text
            self._writer.update(state.row.key, **changes)
            self._unreached += 1
            self._end(state, Phase.ERROR, text, quiet=True)
            return
        elif (
            isinstance(error, ka.PolicyError | ka.InvalidRequestError)
            and not isinstance(error, ka.TaskNotFoundError)
            and state.task_id is None
        ):
            # The server refused this request: sending it again would be refused again.
            phase = Phase.REJECTED
            changes.update(outcome="rejected", finished_at=time.time())
        self._writer.update(state.row.key, **changes)
        self._end(state, phase, text)

    def _end(self, state: RowState, phase: Phase, message: str, *, quiet: bool = False) -> None:
        state.move(phase)
        if phase is not Phase.DONE:
            state.error = message
        self._reporter.changed(state, None if quiet else f"{phase.value}: {message}")
        if phase in _FINAL_STATUS and state.row.key in self._open:
            self._final(state, _FINAL_STATUS[phase])
        self._finish(state)

    # --- downloads ----------------------------------------------------------------------------

    def _start_download(self, state: RowState, task: ka.Task) -> None:
        assert self._task_group is not None
        state.task_id = task.task_id
        state.downloading = True
        self._task_group.start_soon(self._download, state, task)

    async def _download(self, state: RowState, task: ka.Task) -> None:
        settings = self._downloads
        async with self._download_slots:
            if state.move(Phase.DOWNLOADING):
                self._reporter.changed(state, None)  # counted, and an event with --json
            target = self._out / state.record.file
            source: ka.Task | str = task
            if state.row.key in self._refresh:
                source = task.task_id
            try:
                result = await self._kling.download(
                    source,
                    target,
                    max_bytes=settings.max_bytes,
                    allowed_hosts=settings.allowed_hosts,
                    allow_private=settings.allow_private,
                    timeout=settings.timeout,
                    retry=settings.retry,
                )
            except (ka.KlingError, OSError) as exc:
                if is_disk_full(exc):
                    self._disk_full = True
                    message = f"download failed: {disk_full_message(self._out)}"
                else:
                    message = f"download failed: {exc}"
                state.error_code = exc.code if isinstance(exc, ka.APIError) else None
                # The task succeeded; its file is not on disk (a row once done included).
                self._writer.update(state.row.key, outcome=None, error=message)
                self._end(state, Phase.ERROR, message)
                return
        finished_at = time.time()
        video = result.task.video
        self._writer.update(
            state.row.key,
            outcome="done",
            sha256=result.sha256,
            size=result.size,
            video_id=video.id if video else None,
            video_url=result.url,
            error=None,
            finished_at=finished_at,
        )
        record = state.record
        state.record = attrs.evolve(
            record, status="done", sha256=result.sha256, size=result.size, finished_at=finished_at
        )
        submitted_at = record.submitted_at
        took = f", {finished_at - submitted_at:.1f} s" if submitted_at is not None else ""
        state.move(Phase.DONE)
        self._reporter.changed(state, f"saved {record.file} ({result.size} bytes{took})")
        if state.row.key in self._open:
            self._final(state, "done")
        self._finish(state)

    # --- a batch shared through Redis -----------------------------------------------------

    def _poke(self) -> None:
        self._poked.set()

    def _final(self, state: RowState, status: str) -> None:
        if self._share is not None:
            self._finals[state.record.external_task_id] = status
            self._finals_due.set()

    async def _redis_failed(self, exc: BaseException) -> None:
        """Said once until Redis answers again; the caller tries again after a pause."""
        assert self._share is not None
        if not self._redis_failing:
            self._redis_failing = True
            self._reporter.note(
                f"Redis at {self._share.url} is unavailable ({type(exc).__name__}: {exc}); "
                "rows are claimed, taken over and said finished when it is back"
            )
        self._redis_failures += 1
        await anyio.sleep(min(2.0, 0.05 * 2 ** min(self._redis_failures, 6)))

    def _redis_ok(self) -> None:
        self._redis_failures = 0
        if self._redis_failing:
            self._redis_failing = False
            assert self._share is not None
            self._reporter.note(f"Redis at {self._share.url} answers again")

    async def _redis(self, call: Callable[..., Awaitable[_T]], *args: object) -> _T:
        """``call(*args)``, again and again until Redis answers."""
        from redis.exceptions import RedisError

        while True:
            try:
                result = await call(*args)
            except RedisError as exc:
                await self._redis_failed(exc)
                continue
            self._redis_ok()
            return result

    async def _share_start(self) -> None:
        """Say this machine lives, then sort the rows by who holds them: this machine's are
        reached now (a rerun resumes them), the others' are ``elsewhere``, the unclaimed wait
        their turn. Rows ended here before that Redis does not know of are said."""
        share = self._share
        assert share is not None
        while not share.registered:
            await self._beat()
        owners = await self._redis(share.owners, list(self._by_id))
        worked_on = await self._jobs.recorded()
        if any(
            owners[job_id].machine is None
            and (job_id in worked_on or self._by_id[job_id].record.status == "elsewhere")
            for job_id in self._by_id
        ):
            # Rows this machine (or another) held are claimed by nobody: Redis lost them.
            await self._redis(share.lost)
            self._reporter.note(
                f"Redis at {share.url} lost this batch's shared state: every row is looked up "
                "before it is created"
            )
        mine: list[RowState] = []
        elsewhere = 0
        for state in self.states:
            owner = owners[state.record.external_task_id]
            if state.phase.is_final:
                status = _FINAL_STATUS.get(state.phase)
                if (
                    status is not None
                    and owner.machine in (None, share.machine)
                    and not owner.final
                ):
                    self._final(state, status)
                continue
            if owner.machine == share.machine:
                mine.append(state)
            elif owner.machine is not None:
                self._elsewhere(state, owner.machine, owner.final)
                elsewhere += 1
            else:
                self._unclaimed.append(state)
        self._reporter.note(
            f"shared through Redis at {share.url} as machine {share.machine}: "
            f"{len(mine)} rows held here, {elsewhere} by other machines, "
            f"{len(self._unclaimed)} not claimed yet"
        )
        await self._reach_held(mine)

    async def _reach_held(self, states: Sequence[RowState]) -> None:
        """Reach rows this machine holds. A job that ended with no task where its owner is
        gone (a machine that died or left) is let go first, so that this client may send it
        again (looked up first: it may have gone out)."""
        share = self._share
        assert share is not None
        errored = [
            state.record.external_task_id
            for state in states
            if (job := self._kling.job(state.record.external_task_id)) is not None
            and job.status is ka.JobStatus.ERROR
        ]
        if errored:
            await self._redis(share.release_ended, errored)
        for state in states:
            self._reach(state)

    def _elsewhere(self, state: RowState, machine: str | None, final: str | None = None) -> None:
        """Another machine holds the row: its clip goes to that machine's out dir."""
        state.machine = machine
        state.machine_status = final
        if state.job is not None:
            self._by_job.pop(state.job, None)
        if state.phase is not Phase.ELSEWHERE:
            state.move(Phase.ELSEWHERE)
            self._reporter.changed(state, None)
        if state.record.status != "elsewhere":
            self._writer.update(state.row.key, outcome="elsewhere")
            state.record = attrs.evolve(state.record, status="elsewhere")

    async def _share_loop(self) -> None:
        """Claim rows as this machine's wait for slots, take over the rows of machines that
        die or leave, and end the run once the whole batch is done or held by live machines
        that still work on it."""
        share = self._share
        assert share is not None
        every = min(1.0, share.lease / 6)
        looked = -math.inf
        while True:
            poked = self._poked
            await self._claim_more()
            idle = not self._unclaimed and not self._open
            if idle or time.monotonic() - looked >= every:
                look = await self._redis(share.look)
                looked = time.monotonic()
                if look.adopted:
                    await self._take_over(look)
                    continue
                if not look.busy_elsewhere and not self._unclaimed and not self._open:
                    self._finished.set()
                    return
            with anyio.move_on_after(every):
                await poked.wait()
            if poked.is_set():
                self._poked = anyio.Event()

    async def _claim_more(self) -> None:
        """Claim rows while fewer than ``CLAIM_AHEAD`` of this machine's wait for a slot."""
        share = self._share
        assert share is not None
        cause = self.fatal or self.unreachable
        if cause is not None and self._unclaimed:
            # Every row claimed now would end the same way: left to a later run.
            count = len(self._unclaimed)
            self._unclaimed.clear()
            rows = "row" if count == 1 else "rows"
            self._reporter.note(f"{count} {rows} left unclaimed: {cause}")
        while self._unclaimed:
            waiting = sum(self._by_key[key].phase is Phase.WAITING for key in self._open)
            want = CLAIM_AHEAD - waiting
            if want <= 0:
                return
            candidates: list[RowState] = []
            while self._unclaimed and len(candidates) < max(64, 8 * want):
                state = self._unclaimed.popleft()
                if state.phase is Phase.WAITING and state.row.key not in self._open:
                    candidates.append(state)
            if not candidates:
                return
            from redis.exceptions import RedisError

            try:
                claimed = await share.claim(
                    [state.record.external_task_id for state in candidates], want
                )
            except BaseException as exc:
                # Not looked at (as far as this machine knows: a claim whose answer was lost
                # is found again, as this machine's, when the row comes round again).
                self._unclaimed.extendleft(reversed(candidates))
                if not isinstance(exc, RedisError):
                    raise
                await self._redis_failed(exc)
                return
            self._redis_ok()
            self._unclaimed.extendleft(reversed(candidates[claimed.examined :]))
            for job_id, machine in claimed.taken.items():
                self._elsewhere(self._by_id[job_id], machine)
            if claimed.mine:
                await self._reach_held([self._by_id[job_id] for job_id in claimed.mine])
            for job_id in claimed.fresh:
                self._reach(self._by_id[job_id], fresh=True)

    async def _take_over(self, look: Look) -> None:
        """Rows of machines that died or left are this machine's now: reached like its own
        (their jobs followed wherever they are, a clip downloaded here)."""
        for machine, count in look.from_machines.items():
            rows = "row" if count == 1 else "rows"
            self._reporter.note(
                f"taking over {count} {rows} of machine {machine}, which stopped answering or left"
            )
        states: list[RowState] = []
        for job_id in look.adopted:
            state = self._by_id.get(job_id)
            if state is None or state.row.key in self._open:
                continue
            if state.phase in _FINAL_STATUS:  # ended here already (a clip in this out dir)
                self._final(state, _FINAL_STATUS[state.phase])
                continue
            if state.downloading and not state.phase.is_final:
                continue  # its download here goes on
            state.downloading = False
            state.machine = state.machine_status = state.error = None
            state.move(Phase.WAITING)
            self._reporter.changed(state, None)
            states.append(state)
        self.taken_over += len(states)
        await self._reach_held(states)

    async def _tell_finals(self) -> None:
        """Say in Redis how rows ended, as soon as they do: a clip is in place (renamed into
        this out dir) before its row is said done, and the sooner that is said, the smaller
        the window in which a machine dying would make another one fetch the clip again. The
        journal follows (a rerun finds a row Redis says this machine did, and that its
        journal does not have as done, still its own: it is downloaded again, here)."""
        while True:
            await self._finals_due.wait()
            self._finals_due = anyio.Event()
            await self._send_finals()

    async def _send_finals(self) -> None:
        share = self._share
        assert share is not None
        while self._finals:
            batch = dict(self._finals)
            await self._redis(share.finals, batch)
            for job_id, status in batch.items():
                if self._finals.get(job_id) == status:
                    del self._finals[job_id]

    async def _heartbeats(self) -> None:
        assert self._share is not None
        while True:
            await anyio.sleep(self._share.lease / 6)
            await self._beat()

    async def _beat(self) -> None:
        from redis.exceptions import RedisError

        share = self._share
        assert share is not None
        try:
            evicted, lost = await share.heartbeat(len(self._open))
            if lost:
                await self._resync()
            if evicted:
                await self._evicted()
                await share.heartbeat(len(self._open))
        except RedisError as exc:
            await self._redis_failed(exc)
            return
        self._redis_ok()

    async def _drop_lost(self, holders: Mapping[str, str | None]) -> int:
        """Rows this machine worked on that another one holds now (row id -> holder)."""
        assert self._share is not None
        lost = 0
        for job_id, machine in holders.items():
            state = self._by_id[job_id]
            if machine == self._share.machine or state.row.key not in self._open:
                continue
            self._open.discard(state.row.key)
            self._elsewhere(state, machine)
            lost += 1
        self._poke()
        return lost

    async def _evicted(self) -> None:
        """This machine was taken for dead (silent for half a lease): the rows others took
        over are theirs now (their downloads here, if any, still finish)."""
        share = self._share
        assert share is not None
        held = [self._by_key[key].record.external_task_id for key in self._open]
        owners = await share.owners(held)
        if any(owners[job_id].machine is None for job_id in held):
            await self._resync()  # not taken over: Redis lost the batch's state
            return
        lost = await self._drop_lost({job_id: owners[job_id].machine for job_id in held})
        self._reporter.note(
            f"this machine was taken for dead (silent for {share.lease / 2:g} s or more); "
            f"{lost} of its rows went to other machines"
        )

    async def _resync(self) -> None:
        """Redis lost the batch's state (a restart without persistence): claim this machine's
        rows again, say again what ended here, and (once the other machines have had the
        time to claim theirs again) look at the rows they held as if unclaimed. From now on
        every row is looked up before it is created."""
        share = self._share
        assert share is not None
        self._reporter.note(
            f"Redis at {share.url} lost this batch's shared state; claiming this machine's "
            "rows again (every row is now looked up before it is created)"
        )
        await share.lost()
        held = [self._by_key[key].record.external_task_id for key in self._open]
        if held:
            claimed = await share.claim(held, len(held))
            await self._drop_lost(dict(claimed.taken))
        for state in self.states:
            if state.phase in _FINAL_STATUS and state.machine is None:
                self._final(state, _FINAL_STATUS[state.phase])
        assert self._task_group is not None
        self._task_group.start_soon(self._requeue_elsewhere, share.lease / 2)

    async def _requeue_elsewhere(self, after: float) -> None:
        await anyio.sleep(after)
        for state in self.states:
            if state.phase is Phase.ELSEWHERE and state.machine_status is None:
                state.move(Phase.WAITING)
                self._unclaimed.append(state)
        self._poke()


async def verify_done(out: Path, records: Mapping[str, JournalRow]) -> set[str]:
    """Keys of done rows to skip (their files checked in a worker thread)."""
    done = [record for record in records.values() if record.status == "done"]
    if not done:
        return set()
    return await anyio.to_thread.run_sync(_verified, out, done)
