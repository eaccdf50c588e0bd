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
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.abc
import attrs

import kling_async as ka

from ._files import PART_SUFFIX, disk_full_message, is_disk_full
from ._jobs import BatchJobs, write_failure
from ._journal import Journal, JournalRow, stored_request
from ._progress import Reporter
from ._rows import Phase, RowState

__all__ = [
    "BatchOutcome",
    "BatchRunner",
    "DownloadSettings",
    "JournalWriter",
    "remove_stale_parts",
    "verify_done",
]


#: How often the runner looks at the client's connection health.
_CONNECTION_CHECK_SECONDS = 0.5


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
        self._open = 0
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
                self._launch()
                await self._finished.wait()
                task_group.cancel_scope.cancel()
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self._writer.flush()
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

    def _launch(self) -> None:
        """Reach every row's job; called once ``events()`` listens, so what a job did before
        (the client resumed it when it opened) is read from the job and nothing is missed."""
        for state in self.states:
            if state.phase.is_final:
                continue
            self._open += 1
            job = self._kling.job(state.record.external_task_id)
            if job is None or (job.done and job.task_id is None):
                with warnings.catch_warnings():
                    # Unknown model names were reported once when the file was read.
                    warnings.simplefilter("ignore", ka.UnknownModelWarning)
                    job = self._kling.submit(stored_request(state.record), resume=True)
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
        if self._open == 0:
            self._finished.set()

    def _watch(self, state: RowState, job: ka.Job) -> None:
        state.job = job
        self._by_job[job] = state

    def _finish(self, state: RowState) -> None:
        self._open -= 1
        if self._open <= 0:
            self._finished.set()

    # --- events -------------------------------------------------------------------------------

    def _on_event(self, state: RowState, event: ka.JobEvent) -> None:
        self._on_change(state, event.job, event.status, event.task)

    def _on_change(
        self, state: RowState, job: ka.Job, status: ka.JobStatus, task: ka.Task | None
    ) -> None:
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
            state.move(Phase.DOWNLOADING)
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
        self._finish(state)


async def verify_done(out: Path, records: Mapping[str, JournalRow]) -> set[str]:
    """Keys of done rows to skip (their files checked in a worker thread)."""
    done = [record for record in records.values() if record.status == "done"]
    if not done:
        return set()
    return await anyio.to_thread.run_sync(_verified, out, done)
