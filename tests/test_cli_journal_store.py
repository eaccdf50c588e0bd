"""Review of "the batch journal is one job store": the journal file holds the job store's
``kling_jobs`` beside the batch's ``rows``, ``BatchJobs`` is the client's store, and the run
reaches each row's job through ``kling.job(id)`` / ``kling.submit(..., resume=True)``.

Each test judges by the emulator's ground truth (creates per external id) over loopback, as
``test_cli.py`` does: each proves a guarantee of ``docs/cli.md`` under the new layout (two of
them failed before the fixes the review led to).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .cli_helpers import (
    KEY,
    EmulatorProcess,
    assert_complete,
    batch_command,
    check_no_key,
    child_env,
    cli_process,
    created_for,
    journal_rows,
    kill_when,
    run_cli,
    run_main,
    write_prompts,
)

ROOT = Path(__file__).resolve().parent.parent
JOURNAL = "kling-journal.sqlite3"
#: The last commit before the change under review: its journals are what users have (schema 2).
RELEASED = "6628910"


def job_records(out: Path) -> dict[str, dict[str, Any]]:
    """The job store's records in the journal file, by job id (read-only)."""
    path = out / JOURNAL
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in db.execute("SELECT * FROM kling_jobs")}


def summary_rows(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((out / "summary.json").read_text())["rows"]
    return rows


def creates(emu: EmulatorProcess) -> int:
    count: int = emu.stats()["requests_per_route"].get("create", 0)
    return count


# --- 1. a row never sent is created directly, not flagged ---


def test_rows_an_account_error_kept_from_being_sent_are_not_flagged_on_the_rerun(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 5, "unsent")
    out = tmp_path / "out"
    command = batch_command(prompts, out, server, "--max-active", "1")
    server.configure(account_error=1102)
    first = run_main(command)
    assert first.code == 3, first.text
    rows = journal_rows(out)
    assert created_for(server, rows) == [0] * 5
    records = job_records(out)
    never_sent = {
        row["external_task_id"] for row in rows if not records[row["external_task_id"]]["sent"]
    }
    assert len(never_sent) >= 3, (
        "the account error stopped the queue: most rows never reached the mark"
    )

    server.configure(account_error=None, duplicate_external_id="allow")
    again = run_main(command)
    assert again.code == 0, again.text
    assert_complete(server, out, 5)
    flagged = {row["external_task_id"] for row in summary_rows(out) if row["possible_duplicate"]}
    assert flagged & never_sent == set(), "rows never sent are flagged as possible duplicates"


# --- 2. the status view reads as before ---


def test_a_succeeded_row_still_reads_succeeded_after_an_interrupted_rerun(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2, "succeeded")
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.faults({"download": {"ERROR_5XX_BEFORE_COMMIT": 1.0}})
    first = run_main(command)
    assert first.code == 1, first.text
    assert [row["status"] for row in journal_rows(out)] == ["succeeded", "succeeded"]

    # The rerun follows the tasks again; their polls stall, and Ctrl-C comes meanwhile.
    server.faults({"query": {"STALL_AFTER_COMMIT": 1.0}, "stall_seconds": 5})
    gets = server.stats()["requests_per_route"].get("get", 0)
    batch = cli_process(command)
    try:
        deadline_ok = False
        for _ in range(4000):
            if server.stats()["requests_per_route"].get("get", 0) >= gets + 2:
                deadline_ok = True
                break
            assert batch.poll() is None, "the rerun ended before its polls"
            time.sleep(0.005)
        assert deadline_ok, "the rerun never polled its tasks"
    finally:
        batch.send_signal(signal.SIGINT)
        out_text, err_text = batch.communicate(timeout=30)
        check_no_key(out_text, err_text)
    assert batch.returncode == 130, err_text
    server.faults(None)
    assert [row["status"] for row in journal_rows(out)] == ["succeeded", "succeeded"]
    assert [row["status"] for row in summary_rows(out)] == ["succeeded", "succeeded"]
    status = run_main(["status", str(out)])
    assert "succeeded" in status.out and "submitted" not in status.out, status.out


# --- 3. orphans are left alone ---


def test_rows_removed_from_the_file_after_a_kill_are_neither_created_nor_followed(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    """One slot, slow tasks: row 1 is followed by its task id, rows 2-4 are journaled and
    never sent at the kill. Rows 3 and 4 leave the file: the rerun must not send them (nor
    look them up)."""
    prompts = write_prompts(tmp_path / "p.txt", 4, "orphan")
    out = tmp_path / "out"
    command = batch_command(prompts, out, server, "--max-active", "1")
    server.configure(median_duration=300)
    batch = cli_process(command)

    def row_1_followed() -> bool:
        rows = journal_rows(out)
        return len(rows) == 4 and rows[0]["task_id"] is not None

    kill_when(batch, row_1_followed)
    rows = journal_rows(out)
    assert created_for(server, rows) == [1, 0, 0, 0]
    lines = prompts.read_text().splitlines(keepends=True)
    prompts.write_text("".join(lines[:2]))

    server.configure(median_duration=90)
    lookups = server.stats()["requests_per_route"].get("get_by_external_id", 0)
    result = run_cli(command)
    assert result.code == 0, result.text
    assert "the journal has 2 rows the file no longer has" in result.err
    assert "2 of them unfinished" in result.err
    after = journal_rows(out)
    assert created_for(server, after) == [1, 1, 0, 0]
    assert [row["status"] for row in after] == ["done", "done", "pending", "pending"]
    # Nothing was looked up for the orphans either: the rows never sent were created directly.
    assert server.stats()["requests_per_route"].get("get_by_external_id", 0) == lookups
    assert [row["status"] for row in summary_rows(out)] == ["done", "done"]


# --- 4. a store that cannot record the mark stops the run before the create ---


def test_a_journal_that_refuses_the_mark_stops_the_run_before_the_create_goes_out(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3, "refused")
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.configure(account_error=1102)  # makes the journal, sends nothing
    assert run_main(command).code == 3
    server.configure(account_error=None)
    with contextlib.closing(sqlite3.connect(out / JOURNAL)) as db, db:
        for event in ("INSERT", "UPDATE"):
            db.execute(
                f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON kling_jobs "
                "WHEN NEW.sent = 1 AND NEW.status = 'submitting' "
                "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
            )
    stopped = run_main(command)
    assert stopped.code == 1, stopped.text
    assert "cannot write the journal" in stopped.err
    assert "Traceback" not in stopped.text
    assert created_for(server, journal_rows(out)) == [0, 0, 0]  # not one create without its mark

    with contextlib.closing(sqlite3.connect(out / JOURNAL)) as db, db:
        db.execute("DROP TRIGGER refuse_insert")
        db.execute("DROP TRIGGER refuse_update")
    again = run_main(command)
    assert again.code == 0, again.text
    assert_complete(server, out, 3)


# --- 5. a journal of the released version, killed mid-run, resumes ---


def released_tree(tmp_path: Path) -> Path:
    """The released version's package (``git archive``, read-only), or skip."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not available")
    target = tmp_path / "released"
    target.mkdir()
    archive = subprocess.run(  # noqa: S603
        [git, "-C", str(ROOT), "archive", RELEASED, "kling_async"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {RELEASED} is not in this checkout")
    subprocess.run(  # noqa: S603
        ["tar", "-x", "-C", str(target)],  # noqa: S607
        input=archive.stdout,
        check=True,
    )
    return target


def released_rows(out: Path) -> list[tuple[str, str | None, str]]:
    path = out / JOURNAL
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            found = db.execute(
                "SELECT external_task_id, task_id, status FROM rows ORDER BY number"
            ).fetchall()
        except sqlite3.OperationalError:
            return []
    return [(str(a), b, str(c)) for a, b, c in found]


@pytest.mark.parametrize("kill_point", ["posted-unanswered", "one-running"])
def test_a_journal_the_released_version_left_at_a_kill_resumes_billing_no_row_twice(
    server: EmulatorProcess, tmp_path: Path, kill_point: str
) -> None:
    tree = released_tree(tmp_path)
    prompts = write_prompts(tmp_path / "p.txt", 4, f"released-{kill_point}")
    out = tmp_path / "out"
    if kill_point == "posted-unanswered":
        command = batch_command(prompts, out, server)
        server.faults({"create": {"STALL_AFTER_COMMIT": 1.0}, "stall_seconds": 5})
    else:
        command = batch_command(prompts, out, server, "--max-active", "1")
        server.configure(median_duration=300)
    env = child_env(KLING_API_KEY=KEY, PYTHONPATH=str(tree))
    old = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "kling_async.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tree,
    )

    def ready() -> bool:
        rows = released_rows(out)
        created = server.stats()["created_per_external_id"]
        counts = [created.get(external, 0) for external, _, _ in rows]
        if kill_point == "posted-unanswered":
            return len(rows) == 4 and counts == [1, 1, 1, 1]
        return len(rows) == 4 and any(task_id for _, task_id, _ in rows)

    kill_when(old, ready)
    before = released_rows(out)
    with contextlib.closing(sqlite3.connect(out / JOURNAL)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)
    server.reset()

    result = run_cli(command)
    assert result.code == 0, result.text
    rows = assert_complete(server, out, 4)  # one task per row, every clip whole
    for (external, task_id, _), row in zip(before, rows, strict=True):
        assert row["external_task_id"] == external
        if task_id is not None:
            assert row["task_id"] == task_id  # every task id the old journal held is kept


# --- 6. no secret in the journal, its WAL included, after a kill ---


def test_no_key_reaches_the_journal_or_its_wal_even_after_a_kill(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3, "secret")
    out = tmp_path / "out"
    command = [*batch_command(prompts, out, server), "--api-key", KEY]
    server.configure(median_duration=400)
    batch = cli_process(command, env=child_env())
    kill_when(
        batch, lambda: bool(journal_rows(out)) and all(r["task_id"] for r in journal_rows(out))
    )
    files = [p for p in out.iterdir() if p.name.startswith(JOURNAL)]
    assert any(p.name.endswith("-wal") for p in files)
    for path in files:
        check_no_key(path.read_bytes().decode("latin-1"))
    assert job_records(out), "the job records are in the journal file"
