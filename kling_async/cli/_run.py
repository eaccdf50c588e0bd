"""``kling-async batch``: the journal, the run, the summary, and how a run ends.

Order matters, and is the crash-safety argument:

1. the whole file and every setting were validated (by the caller) before this module runs;
2. the out directory is locked (one batch per directory, whatever its ``--journal``), the
   journal is opened under its own lock (its job store's tables with it, an old journal
   migrated) and reconciled with the file in one synced transaction (every row and its
   ``external_task_id`` on disk) before the client even starts;
3. the client opens with the journal as its job store and resumes the jobs of the file's rows
   (no others); the runner reaches each row's job, follows and downloads, recording as it goes
   (the engine records the jobs, the runner what is the batch's);
4. however the run ends (finished, account stopped, Ctrl-C), the pending journal updates are
   flushed, ``summary.json`` is written and the exit status says which of those it was.

SIGINT and SIGTERM cancel the run cleanly (every background task of the client lives in its
scope); a second Ctrl-C during that short cleanup is not needed and not special.

With ``--redis`` the batch is shared by the machines that run it (:mod:`._shared`): the batch
id comes from the file, the client keeps its jobs in Redis (not in the journal, which keeps a
copy for ``status``), the runner works on the rows this machine claims or takes over, and the
summary adds what Redis knows of the whole batch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anyio
import attrs
from rich.console import Console

import kling_async as ka

from . import _files
from ._batch import BatchRunner, remove_stale_parts, verify_done
from ._display import plain
from ._jobs import BatchJobs
from ._journal import TERMINAL, Journal, JournalError, JournalRow, Preparation
from ._messages import say, tell
from ._progress import (
    JsonProgress,
    LiveProgress,
    PlainProgress,
    QuietProgress,
    Reporter,
    now_iso,
    write_json_line,
)
from ._prompts import PromptFile
from ._rows import Phase, RowState
from ._settings import EMULATOR_STATE_NAME, BatchSettings, open_client
from ._summary import (
    SUMMARY_NAME,
    SummaryRow,
    batch_counts,
    build_summary,
    render_batch_counts,
    render_summary,
    write_summary,
)

__all__ = [
    "EXIT_ACCOUNT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "LOCK_NAME",
    "run_batch",
    "say",
]

#: The lock file in the out directory: one batch per directory, whatever its journal.
LOCK_NAME = ".kling-batch.lock"

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_ACCOUNT = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130


def _interrupted_hint(settings: BatchSettings) -> str:
    return f"interrupted; rerun the same command to resume (journal: {settings.journal})"


@attrs.define
class _Shared:
    """A shared batch, as this machine leaves it: its name, Redis (without a password), and
    who holds each row and how it ended (row id -> (machine, final status)) as Redis said at
    the end (None: Redis could not say)."""

    machine: str
    url: str
    holders: Mapping[str, tuple[str | None, str | None]] | None = None
    taken_over: int = 0


@attrs.define
class _Run:
    """What one run has got to, filled in as it goes so an interrupted run can be summarised."""

    preparation: Preparation | None = None
    states: list[RowState] = attrs.Factory(list)
    fatal: ka.KlingError | None = None
    interrupted: bool = False
    disk_full: bool = False
    unreachable: ka.UnreachableError | None = None
    shared: _Shared | None = None


def restart_rule(
    settings: BatchSettings, verified: set[str], *, emulator_lost: bool = False
) -> Callable[[JournalRow], bool]:
    """Which journal rows start over as a new attempt (a new task, a new external id).

    ``emulator_lost``: the built-in emulator's state file is gone (deleted by hand): its
    tasks and URLs went with it, so what is not safely on disk starts over (no account is
    billed). With the state file in place, an ``--emulator`` run resumes like any other.
    """

    def restart(record: JournalRow) -> bool:
        if settings.retry_failed and record.status in ("failed", "rejected"):
            return True
        return emulator_lost and (
            record.status not in TERMINAL
            or (record.status == "done" and record.key not in verified)
        )

    return restart


def _states(
    prompt_file: PromptFile, preparation: Preparation, verified: set[str], retry: bool
) -> list[RowState]:
    changed = {row.key: known for row, known in preparation.changed}
    states = []
    for row in prompt_file.rows:
        if row.key in changed:
            states.append(RowState(row, changed[row.key], Phase.CHANGED, earlier=True))
            continue
        record = preparation.rows[row.key]
        state = RowState(row, record, Phase.WAITING, task_id=record.task_id)
        if record.status == "done" and record.key in verified:
            state.phase, state.earlier = Phase.DONE, True
        elif record.status in ("failed", "rejected") and not retry:
            state.phase, state.earlier = Phase(record.status), True
            state.error = record.error
        states.append(state)
    return states


def _report_preparation(preparation: Preparation) -> None:
    for row, _known in preparation.changed[:10]:
        tell(
            f"warning: row {row.number} (line {row.line}) has external_task_id "
            f"{row.request.external_task_id!r}, which an earlier run journaled with another "
            "request, so it is not sent (that version may already be billed): undo the "
            "change, or give the row a new external_task_id"
        )
    if len(preparation.changed) > 10:
        tell(f"warning: ... and {len(preparation.changed) - 10} more changed rows")
    orphans = preparation.orphans
    if orphans:
        plural = "s" if len(orphans) != 1 else ""
        numbers = ", ".join(str(row.number) for row in orphans[:10])
        more = ", ..." if len(orphans) > 10 else ""
        unfinished = sum(row.status not in TERMINAL for row in orphans)
        resumed = (
            f"; {unfinished} of them unfinished: their tasks are not followed, nor sent "
            "again, by this run (put a row back in the file to resume it)"
            if unfinished
            else ""
        )
        tell(
            f"note: the journal has {len(orphans)} row{plural} the file no longer has "
            f"(removed or edited; row{plural} {numbers}{more} when last run); left as they "
            f"are, clips included{resumed}"
        )


def _opening(states: list[RowState], journal: Journal) -> str:
    """``12 rows (batch 2afab8bd65a3): 10 done earlier, 2 to do``."""
    earlier = Counter(state.phase.value for state in states if state.earlier)
    to_do = len(states) - sum(earlier.values())
    parts = [
        f"{count} {phase} (not sent)" if phase == "changed" else f"{count} {phase} earlier"
        for phase, count in sorted(earlier.items())
    ]
    parts.append(f"{to_do} to do")
    return f"{len(states)} rows (batch {journal.batch_id}): " + ", ".join(parts)


def _reporter(settings: BatchSettings, console: Console, journal: Journal) -> Reporter:
    if settings.json:
        return JsonProgress(
            batch_id=journal.batch_id,
            out=str(settings.out),
            journal=str(settings.journal),
            summary=str(settings.out / SUMMARY_NAME),
        )
    if settings.quiet:
        return QuietProgress()
    live = settings.progress == "live" or (settings.progress == "auto" and console.is_terminal)
    return LiveProgress(console) if live else PlainProgress()


async def _watch_signals(scope: anyio.CancelScope, run: _Run) -> None:
    """Turn SIGINT / SIGTERM into a clean cancellation of the run. Only the first: a second
    Ctrl-C during the short cleanup interrupts it the usual way."""
    try:
        receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        with receiver as signals:
            async for _signum in signals:
                run.interrupted = True
                scope.cancel()
                return
    except NotImplementedError:  # pragma: no cover - Windows: KeyboardInterrupt does it
        return


async def _execute(
    settings: BatchSettings,
    prompt_file: PromptFile,
    journal: Journal,
    console: Console,
    run: _Run,
) -> int | None:
    """Steps 2 and 3 of the module docstring; an exit status for problems found first."""
    jobs = BatchJobs(journal)
    try:
        await jobs.open()
    except JournalError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    try:
        return await _execute_with(settings, prompt_file, journal, jobs, console, run)
    finally:
        with anyio.CancelScope(shield=True):
            await jobs.aclose()


async def _execute_with(
    settings: BatchSettings,
    prompt_file: PromptFile,
    journal: Journal,
    jobs: BatchJobs,
    console: Console,
    run: _Run,
) -> int | None:
    known = journal.rows()
    verified = await verify_done(settings.out, known)
    lost = settings.emulator and bool(known) and not (settings.out / EMULATOR_STATE_NAME).exists()
    shared_id = None
    name_machine = None
    if settings.shared:
        from ._shared import machine_name, shared_batch_id

        shared_id = shared_batch_id(settings.backend, prompt_file.rows)
        name_machine = machine_name
    try:
        preparation = journal.prepare(
            prompt_file.rows,
            backend=settings.backend,
            prompts=str(prompt_file.path),
            restart=restart_rule(settings, verified, emulator_lost=lost),
            batch_id=shared_id,
            machine=name_machine,
        )
    except JournalError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    run.preparation = preparation
    _report_preparation(preparation)
    remove_stale_parts(settings.out)
    run.states = _states(prompt_file, preparation, verified, settings.retry_failed)
    # The client resumes the jobs of these rows only (changed and orphan rows are not here).
    jobs.plan(
        (state.record, not state.phase.is_final)
        for state in run.states
        if state.phase is not Phase.CHANGED
    )
    reporter = _reporter(settings, console, journal)
    if settings.emulator:
        reporter.note("using the built-in emulator: no account needed, placeholder clips")
    reporter.note(_opening(run.states, journal))
    _files.remove_stale_temporaries(settings.out, SUMMARY_NAME)
    if settings.shared:
        return await _execute_shared(settings, journal, jobs, reporter, run)
    async with open_client(settings, store=jobs) as kling:
        runner = BatchRunner(
            kling,
            journal,
            jobs,
            run.states,
            out=settings.out,
            downloads=settings.downloads,
            reporter=reporter,
        )
        outcome = await runner.run()
        run.fatal = outcome.fatal
        run.disk_full = outcome.disk_full
        run.unreachable = outcome.unreachable
    return None


async def _execute_shared(
    settings: BatchSettings,
    journal: Journal,
    jobs: BatchJobs,
    reporter: Reporter,
    run: _Run,
) -> int | None:
    """Step 3 for a batch shared through Redis: the client keeps its jobs there, under this
    machine's name; the runner claims, takes over and says what ended."""
    from redis.exceptions import RedisError

    from ._shared import SharedError, shared_client

    assert run.preparation is not None
    assert journal.batch_id is not None
    assert journal.machine is not None
    # This journal ran the batch before: Redis should know the batch (if not, it lost it).
    ran_before = len(run.preparation.fresh) < len(run.preparation.rows)
    try:
        async with shared_client(
            settings,
            batch_id=journal.batch_id,
            machine=journal.machine,
            rows=len(run.states),
            expect=ran_before,
        ) as (kling, share):
            run.shared = _Shared(journal.machine, share.url)
            runner = BatchRunner(
                kling,
                journal,
                jobs,
                run.states,
                out=settings.out,
                downloads=settings.downloads,
                reporter=reporter,
                share=share,
            )
            try:
                outcome = await runner.run()
                run.fatal = outcome.fatal
                run.disk_full = outcome.disk_full
                run.unreachable = outcome.unreachable
            finally:
                run.shared.taken_over = runner.taken_over
                ids = [state.record.external_task_id for state in run.states]
                with anyio.move_on_after(3.0, shield=True), contextlib.suppress(RedisError):
                    owners = await share.owners(ids)
                    run.shared.holders = {
                        job_id: (owner.machine, owner.final) for job_id, owner in owners.items()
                    }
    except SharedError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    return None


async def run_batch(settings: BatchSettings, prompt_file: PromptFile, console: Console) -> int:
    """Run a validated batch to its end; return the exit status."""
    if settings.redis_url is not None:
        from ._shared import SharedError, check_reachable

        try:
            await check_reachable(settings.redis_url)
        except SharedError as exc:
            say(f"error: {exc}")
            return EXIT_USAGE
    try:
        out_lock = _files.lock(
            settings.out / LOCK_NAME,
            busy=f"another kling-async batch is using {settings.out} right now; wait for it "
            "to finish or stop it first",
        )
    except _files.FileError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except OSError as exc:
        full = _files.is_disk_full(exc)
        reason = _files.disk_full_message(settings.out) if full else str(exc)
        say(f"error: cannot lock {settings.out / LOCK_NAME}: {reason}")
        return EXIT_USAGE
    try:
        return await _run_locked(settings, prompt_file, console)
    finally:
        _files.unlock(out_lock)


async def _run_locked(settings: BatchSettings, prompt_file: PromptFile, console: Console) -> int:
    try:
        journal = Journal.open(settings.journal)
    except JournalError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    run = _Run()
    status: int | None = None
    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(_watch_signals, task_group.cancel_scope, run)
            status = await _execute(settings, prompt_file, journal, console, run)
            task_group.cancel_scope.cancel()
        if status is not None:
            return status
        if run.preparation is None:  # interrupted before the journal was reconciled
            say(_interrupted_hint(settings))
            return EXIT_INTERRUPTED
        return _finish(settings, prompt_file, journal, run, console)
    finally:
        journal.close()


def _finish(
    settings: BatchSettings,
    prompt_file: PromptFile,
    journal: Journal,
    run: _Run,
    console: Console,
) -> int:
    assert run.preparation is not None
    changed = {
        row.key: "differs from the request an earlier run journaled under this "
        "external_task_id; not sent"
        for row, _ in run.preparation.changed
    }
    errored = {
        state.row.key: state.error or "error" for state in run.states if state.phase is Phase.ERROR
    }
    shared = run.shared
    holders = None
    extra: dict[str, object] = {}
    if shared is not None:
        by_id = shared.holders
        holders = {
            state.row.key: by_id.get(state.record.external_task_id, (None, None))
            if by_id is not None
            else (state.machine, state.machine_status)
            for state in run.states
        }
        extra["shared"] = {
            "redis": shared.url,
            "machine": shared.machine,
            "taken_over": shared.taken_over,
            **(
                batch_counts(shared.holders.values(), shared.machine)
                if shared.holders is not None
                else {"counts": None}
            ),
        }
    summary = build_summary(
        prompt_file.rows,
        journal.rows(),
        changed=changed,
        errored=errored,
        holders=holders,
        machine=shared.machine if shared is not None else None,
    )
    summary_path = settings.out / SUMMARY_NAME
    written = True
    try:
        write_summary(
            summary_path,
            summary,
            batch_id=journal.batch_id,
            prompts=str(prompt_file.path),
            journal=str(settings.journal),
            interrupted=run.interrupted,
            **extra,
        )
    except OSError as exc:
        written = False
        if _files.is_disk_full(exc):
            say(f"error: {_files.disk_full_message(settings.out)}: {summary_path} not written")
        else:
            say(f"error: cannot write {summary_path}: {exc}")
    human = not settings.json and not settings.quiet
    if human:
        render_summary(console, summary, every_row=settings.verbose)
        if shared is not None:
            render_batch_counts(
                console,
                journal.batch_id or "?",
                shared.machine,
                None if shared.holders is None else list(shared.holders.values()),
            )
    code, last = _ending(settings, run, summary, summary_path if written else None)
    if settings.json:
        write_json_line(
            sys.stdout,
            _summary_event(settings, journal, run, summary, code, extra, written),
        )
    if settings.json:
        say(last)  # stdout holds JSON only
    elif code == EXIT_INTERRUPTED:
        say(last)
    else:
        console.print(plain(last), soft_wrap=True)
    return code


def _counts(summary: Sequence[SummaryRow]) -> str:
    counts = Counter(row.status for row in summary)
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


def _ending(
    settings: BatchSettings, run: _Run, summary: Sequence[SummaryRow], path: Path | None
) -> tuple[int, str]:
    """The exit status and the last line, after the errors that explain it (said here)."""
    where = (
        f"all rows in {path}"
        if path is not None
        else f"{SUMMARY_NAME} could not be written; kling-async status {settings.out} lists them"
    )
    rows = f"{len(summary)} rows: {_counts(summary)}"
    if run.disk_full:
        say(
            f"error: {_files.disk_full_message(settings.out)}: clips could not be saved; free "
            "some space, then rerun the same command (finished tasks are downloaded, not "
            "created again)"
        )
    if run.interrupted:
        return EXIT_INTERRUPTED, f"{_interrupted_hint(settings)}; {rows}; {where}"
    if run.fatal is not None:
        say(
            f"error: the account cannot create tasks ({run.fatal}); fix it, then rerun the "
            "same command to resume"
        )
        return EXIT_ACCOUNT, f"{rows}; {where}"
    if run.unreachable is not None:
        gone = run.unreachable
        say(
            f"error: cannot reach {gone.host} ({gone.reason}, for {gone.seconds:.0f} s): check "
            "--base-url or KLING_BASE_URL, the network and any proxy, then rerun the same "
            "command (tasks already created are followed, not sent again)"
        )
        return EXIT_UNREACHABLE, f"{rows}; {where}"
    unfinished = sum(
        row.status != "done" and not (row.status == "elsewhere" and row.machine_status == "done")
        for row in summary
    )
    if not unfinished:
        code = EXIT_OK if path is not None else EXIT_SOME_FAILED
        return code, f"{rows}; clips in {settings.out}/, {where}"
    if run.shared is not None:
        return EXIT_SOME_FAILED, (
            f"{rows}; {where} (rows of other machines in their summaries); rerunning the same "
            "command on any machine resumes its rows and takes over those of machines that "
            "are gone"
        )
    return EXIT_SOME_FAILED, f"{rows}; {where}; {_advice(summary)}"


def _advice(summary: Sequence[SummaryRow]) -> str:
    """What a rerun would do about the rows not done."""
    counts = Counter(row.status for row in summary)
    failed = counts["failed"] + counts["rejected"]
    resumable = len(summary) - counts["done"] - failed - counts["changed"]
    advice = []
    if resumable:
        advice.append(f"rerun the same command to resume the {resumable} unfinished")
    if failed:
        advice.append(f"--retry-failed resends the {failed} (billed again)")
    if counts["changed"]:
        advice.append(f"{counts['changed']} changed rows are not sent (see the warnings above)")
    return "; ".join(advice)


def _summary_event(
    settings: BatchSettings,
    journal: Journal,
    run: _Run,
    summary: Sequence[SummaryRow],
    code: int,
    extra: Mapping[str, object],
    written: bool,
) -> dict[str, object]:
    """The last ``--json`` line: the counts, how the run ended, and every row not done."""
    codes = {state.row.key: state.error_code for state in run.states}
    return {
        "event": "summary",
        "time": now_iso(),
        "batch_id": journal.batch_id,
        "rows": len(summary),
        "counts": dict(sorted(Counter(row.status for row in summary).items())),
        "exit_status": code,
        "interrupted": run.interrupted,
        "out": str(settings.out),
        "summary": str(settings.out / SUMMARY_NAME) if written else None,
        "journal": str(settings.journal),
        "not_done": [
            {
                "row": row.row,
                "line": row.line,
                "external_task_id": row.external_task_id,
                "task_id": row.task_id,
                "status": row.status,
                "error": row.error,
                "error_code": codes.get(row.key),
            }
            for row in summary
            if row.status != "done"
        ],
        **extra,
    }


def interrupted_before_start(settings: BatchSettings) -> int:
    say(_interrupted_hint(settings))
    return EXIT_INTERRUPTED
