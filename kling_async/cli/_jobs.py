"""The journal as the client's job store: the batch's jobs live in the journal file.

The journal file holds the job store's own tables (``kling_jobs``, ``kling_jobs_meta``, kept
by :class:`kling_async.SQLiteJobStore` on its own connection) beside the batch's ``rows``, which
keep only what is the batch's (see :mod:`._journal`). :class:`BatchJobs` is the
:class:`kling_async.JobStore` the run hands to its client, so the engine records each job as
it moves (the mark before its first create included, the one write the engine waits for) and
finds them again when the next run opens it. Why it is more than the store itself:

* **Only this batch's rows are resumed.** :meth:`load` gives back the records of the rows of
  the prompt file as it is now, never those of rows the user deleted or edited away (they
  would be followed, or sent and billed, for nothing), nor of a row's earlier attempt.
* **A row still to do is followed afresh.** A record that ended with a task, for a row whose
  clip is not in place (a task that succeeded, a download that failed, a poll that gave up),
  is given back unfinished, so the engine polls its task again: the download then uses the
  task's current URL, not one that may have expired. A row with no record yet was never
  sent (the engine records ``sent`` before a create goes out), so its job is created
  directly, with no lookup and no doubt.
* **Old journals are migrated keeping every task id.** A schema-3 journal kept each job's state
  in its rows: :meth:`open` writes those as job records first and only then drops the columns,
  so an interruption between the two steps repeats the first, never loses a task id.
* **A store that cannot write stops the run.** The engine would retry and log; a batch that
  cannot record its tasks could not resume them, so :attr:`failed` is set and the runner
  stops with the same words as for a journal update that failed.

A batch shared through Redis (``--redis``) keeps its jobs in Redis, where every machine sees
them (``RedisAccount``): the client gets no store, and the runner keeps a copy of the state of
the jobs of this machine's rows in the same tables (:meth:`BatchJobs.mirror`), so ``status``
and the summary read the journal as always. That copy is never resumed from: a shared journal
is refused to a run without ``--redis``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import anyio
import attrs

import kling_async as ka

from ._files import disk_full_message, is_disk_full
from ._journal import Journal, JournalError, JournalRow, stored_request

__all__ = ["BatchJobs", "job_record", "write_failure"]


def write_failure(journal: Journal, exc: BaseException) -> JournalError:
    """A journal write that failed during the run, said so that a person can act on it."""
    path = journal.path
    problem = (
        f"{disk_full_message(path.parent)}: cannot write the journal {path}"
        if is_disk_full(exc) or "full" in str(exc)
        else f"cannot write the journal {path}: {exc}"
    )
    return JournalError(
        f"{problem}; stopping, since a run that cannot record its tasks could not resume "
        "them. Fix it, then rerun the same command: tasks already created are looked up by "
        "their external_task_id, not created again"
    )


def job_record(job: ka.Job) -> ka.JobRecord:
    """A job's state as a record (for the local copy of a shared batch's jobs)."""
    error = job.to_dict()["error"]
    return ka.JobRecord(
        id=job.id,
        request=job.request,
        task_id=job.task_id,
        status=job.status,
        task=job.task,
        sent=job.status is not ka.JobStatus.QUEUED or job.task_id is not None,
        possible_duplicate=job.possible_duplicate,
        error=None if error is None else str(error["message"]),
        error_type=None if error is None else str(error["type"]),
        created_at=job.created_at.timestamp(),
        updated_at=job.updated_at.timestamp(),
    )


@attrs.frozen
class _Planned:
    """A row of this run as the store gives it back: ``request`` for a record not yet made,
    ``follow`` whether the row still needs its job (else it is given back as it ended)."""

    request: ka.Text2VideoRequest
    follow: bool


class BatchJobs:
    """A :class:`kling_async.JobStore` over the journal file (see the module docstring).

    Open it (``await jobs.open()``) after :meth:`Journal.open`, before :meth:`Journal.prepare`;
    say which rows this run has with :meth:`plan` before the client opens; close it after the
    client has closed (the client writes its last changes on the way out).
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._store = ka.SQLiteJobStore(journal.path)
        self._plan: dict[str, _Planned] = {}
        #: Set when a write failed; :attr:`failure` says why.
        self.failed = anyio.Event()
        self.failure: JournalError | None = None
        #: Records of the local copy (a shared batch) not written yet, by job id.
        self._copies: dict[str, ka.JobRecord] = {}
        self._copied = anyio.Event()
        self._copy_lock = anyio.Lock()

    async def open(self) -> None:
        """Open the job store's tables in the journal file (made if missing), and migrate a
        schema-3 journal; :class:`JournalError` if the file cannot be used."""
        try:
            await self._store.open()
        except ka.JobStoreError as exc:
            raise self._unusable(exc) from None
        try:
            records = self.journal.legacy_records()
            if records is not None:
                try:
                    await self._store.save(records)
                except ka.JobStoreError as exc:
                    raise self._unusable(exc) from None
                except Exception as exc:  # sqlite3's errors, a full disk
                    raise JournalError(
                        f"cannot migrate the journal {self.journal.path}: {exc}"
                    ) from None
                self.journal.finish_migration()
        except BaseException:
            await self._store.aclose()
            raise

    def _unusable(self, exc: Exception) -> JournalError:
        path = self.journal.path
        if "full" in str(exc):
            return JournalError(f"{disk_full_message(path.parent)}: cannot create or open {path}")
        return JournalError(f"{path} is not a usable journal: {exc}")

    async def aclose(self) -> None:
        await self._store.aclose()

    def plan(self, rows: Iterable[tuple[JournalRow, bool]]) -> None:
        """The rows of this run, each with whether it still needs its job (not done, not a
        failed or rejected row left alone); other rows' records are never loaded."""
        self._plan = {
            record.external_task_id: _Planned(stored_request(record), follow)
            for record, follow in rows
        }

    # --- the local copy of a shared batch's jobs -------------------------------------------

    def mirror(self, record: ka.JobRecord) -> None:
        """Keep this job's state in the journal (written soon, with others)."""
        self._copies[record.id] = record
        self._copied.set()

    async def run_mirror(self) -> None:
        while True:
            await self._copied.wait()
            self._copied = anyio.Event()
            await self.flush_mirror()

    async def recorded(self) -> set[str]:
        """The ids of the jobs this journal has a record of (a shared batch: the rows this
        machine has worked on)."""
        try:
            return {record.id for record in await self._store.load()}
        except ka.JobStoreError as exc:
            raise self._unusable(exc) from None

    async def flush_mirror(self) -> None:
        async with self._copy_lock:
            while self._copies:
                batch, self._copies = self._copies, {}
                try:
                    await self.save(batch.values())
                except BaseException:
                    for job_id, record in batch.items():
                        self._copies.setdefault(job_id, record)
                    raise

    # --- learned durations: the journal keeps them between runs (a DurationStore) ---------

    async def load_durations(self) -> dict[tuple[str, str, str], ka.DurationSummary]:
        return await self._store.load_durations()

    async def save_durations(
        self, summaries: Mapping[tuple[str, str, str], ka.DurationSummary]
    ) -> None:
        await self._store.save_durations(summaries)

    async def forget_durations(self) -> None:
        await self._store.forget_durations()

    # --- the JobStore protocol ------------------------------------------------------------

    async def save(self, records: Iterable[ka.JobRecord]) -> None:
        try:
            await self._store.save(records)
        except Exception as exc:
            if self.failure is None:
                self.failure = write_failure(self.journal, exc)
                self.failed.set()
            raise

    async def load(self) -> list[ka.JobRecord]:
        held = {record.id: record for record in await self._store.load()}
        return [
            self._resumed(job_id, planned, held.get(job_id))
            for job_id, planned in self._plan.items()
            if planned.follow or (job_id in held and held[job_id].finished)
        ]

    @staticmethod
    def _resumed(job_id: str, planned: _Planned, record: ka.JobRecord | None) -> ka.JobRecord:
        if record is None:
            now = time.time()
            # No record: the engine never got as far as the mark it writes before a create.
            return ka.JobRecord(id=job_id, request=planned.request, created_at=now, updated_at=now)
        # Given back as it was saved: a row not done whose job ended with a task is looked at
        # again by the run (a fresh URL before its download, or the task followed again),
        # never by rewriting what the record says happened.
        return record
