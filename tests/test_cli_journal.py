"""The journal: rows durable before any POST, stable external ids, rows keyed by content,
changed rows, one owner."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path

import anyio
import attrs
import pytest

import kling_async as ka
from kling_async.cli._jobs import BatchJobs
from kling_async.cli._journal import Journal, JournalError
from kling_async.cli._prompts import Defaults, PromptRow, load_prompts

from .cli_helpers import run_main, write_prompts


def rows_of(path: Path, text: str) -> tuple[PromptRow, ...]:
    path.write_text(text)
    return load_prompts(path, Defaults(), ka.COMETAPI).rows


def open_jobs(journal: Journal) -> None:
    """Open (and close) the journal's job store: makes its tables, migrates a schema-3 file."""

    async def run() -> None:
        jobs = BatchJobs(journal)
        await jobs.open()
        await jobs.aclose()

    anyio.run(run)


def save_jobs(path: Path, *records: ka.JobRecord) -> None:
    """Write job records as a run's client would, into the journal file's job store."""

    async def run() -> None:
        async with ka.SQLiteJobStore(path) as store:
            await store.save(records)

    anyio.run(run)


def test_prepare_writes_every_row_pending_with_a_derived_external_id(tmp_path: Path) -> None:
    text = '{"prompt": "a"}\n{"prompt": "b", "external_task_id": "own"}\n'
    rows = rows_of(tmp_path / "p.jsonl", text)
    journal = Journal.open(tmp_path / "j.sqlite3")
    try:
        preparation = journal.prepare(rows, backend="https://x", prompts="p.jsonl")
        batch = journal.batch_id
        assert batch is not None
        assert preparation.fresh == {rows[0].key, "id:own"}
        assert rows[0].key == f"{rows[0].request_hash}#1"
        records = list(preparation.rows.values())
        assert [r.status for r in records] == ["pending", "pending"]
        assert [r.external_task_id for r in records] == [f"kb-{batch}-1", "own"]
        assert [r.file for r in records] == ["001-a.mp4", "002-b.mp4"]
        # The same file again: nothing new, same ids.
        again = journal.prepare(rows, backend="https://x", prompts="p.jsonl")
        assert again.fresh == frozenset()
        assert [r.external_task_id for r in again.rows.values()] == [f"kb-{batch}-1", "own"]
    finally:
        journal.close()
    # Durable, WAL, fully synced: another connection sees the rows.
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT count(*) FROM rows").fetchone()[0] == 2


def test_edited_rows_are_new_rows_and_own_id_rows_that_changed_are_set_apart(
    tmp_path: Path,
) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    try:
        text = 'a\nb\n{"prompt": "c", "external_task_id": "own"}\n'
        first = rows_of(tmp_path / "p.jsonl", "".join(_jsonl(line) for line in text.splitlines()))
        journal.prepare(first, backend="b", prompts="p")
        batch = journal.batch_id
        edited = 'a\nB changed\n{"prompt": "C", "external_task_id": "own"}\nd\n'
        later = rows_of(tmp_path / "p.jsonl", "".join(_jsonl(line) for line in edited.splitlines()))
        preparation = journal.prepare(later, backend="b", prompts="p")
        assert [row.key for row, _ in preparation.changed] == ["id:own"]
        assert set(preparation.rows) == {later[0].key, later[1].key, later[3].key}
        assert preparation.fresh == {later[1].key, later[3].key}
        assert [row.key for row in preparation.orphans] == [first[1].key]
        # New rows take the counter's next ids, never an earlier row's (b had kb-...-2).
        ids = {key: row.external_task_id for key, row in preparation.rows.items()}
        assert ids[later[1].key] == f"kb-{batch}-4"
        assert ids[later[3].key] == f"kb-{batch}-5"
        shorter = journal.prepare(later[:1], backend="b", prompts="p")
        assert {row.key for row in shorter.orphans} == {
            first[1].key,
            later[1].key,
            later[3].key,
            "id:own",
        }
    finally:
        journal.close()


def _jsonl(line: str) -> str:
    return (line if line.startswith("{") else f'{{"prompt": "{line}"}}') + "\n"


def test_restarted_rows_get_a_new_attempt_and_a_new_external_id(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    try:
        rows = rows_of(tmp_path / "p.txt", "a\n")
        key = rows[0].key
        first = journal.prepare(rows, backend="b", prompts="p").rows[key]
        failed = ka.JobRecord(id=first.external_task_id, task_id="t1", status=ka.JobStatus.FAILED)
        save_jobs(journal.path, failed)
        journal.apply({key: {"error": "boom"}})
        assert journal.rows()[key].status == "failed"
        restarted = journal.prepare(
            rows, backend="b", prompts="p", restart=lambda r: r.status == "failed"
        ).rows[key]
        assert restarted.external_task_id == first.external_task_id + "-a2"
        assert (restarted.status, restarted.task_id, restarted.error) == ("pending", None, None)
        save_jobs(journal.path, attrs.evolve(failed, id=restarted.external_task_id))
        third = journal.prepare(
            rows, backend="b", prompts="p", restart=lambda r: r.status == "failed"
        ).rows[key]
        assert third.external_task_id == first.external_task_id + "-a3"
    finally:
        journal.close()


def test_a_journal_belongs_to_one_backend(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    try:
        rows = rows_of(tmp_path / "p.txt", "a\n")
        journal.prepare(rows, backend="emulator", prompts="p")
        with pytest.raises(JournalError, match="belongs to a batch run against emulator"):
            journal.prepare(rows, backend="https://api.cometapi.com/kling", prompts="p")
    finally:
        journal.close()


def test_only_known_columns_can_be_updated(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    try:
        rows = rows_of(tmp_path / "p.txt", "a\n")
        journal.prepare(rows, backend="b", prompts="p")
        with pytest.raises(ValueError, match="not updatable"):
            journal.apply({rows[0].key: {"request_hash": "x"}})
        with pytest.raises(ValueError, match="not updatable"):
            journal.apply({rows[0].key: {"task_id": "x"}})  # the job store's, not the row's
    finally:
        journal.close()


def test_a_second_batch_on_the_same_journal_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prompts = write_prompts(tmp_path / "p.txt", 1)
    holder = Journal.open(out / "kling-journal.sqlite3")
    try:
        result = run_main(["batch", str(prompts), "--out", str(out), "--emulator"])
    finally:
        holder.close()
    assert result.code == 2
    assert "another kling-async batch is using" in result.err


def test_an_own_id_that_another_row_already_has_is_refused_before_any_post(
    tmp_path: Path,
) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    try:
        journal.prepare(rows_of(tmp_path / "p.txt", "a\n"), backend="b", prompts="p")
        taken = f"kb-{journal.batch_id}-1"
        later = rows_of(tmp_path / "p.jsonl", f'{{"prompt": "b", "external_task_id": "{taken}"}}\n')
        with pytest.raises(JournalError, match="already the id of another row"):
            journal.prepare(later, backend="b", prompts="p")
    finally:
        journal.close()


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "kling-journal.sqlite3").write_text("not a database, just text " * 100)
    prompts = write_prompts(tmp_path / "p.txt", 1)
    result = run_main(["batch", str(prompts), "--out", str(out), "--emulator"])
    assert result.code == 2
    assert "is not a usable journal" in result.err


# --- migration of the journal today's release writes (schema 2) ---------------------------------

#: The rows table of a schema-2 journal, as `git show HEAD~:kling_async/cli/_journal.py` has it.
SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rows (
    row_key TEXT PRIMARY KEY, number INTEGER NOT NULL, line INTEGER NOT NULL,
    request_hash TEXT NOT NULL, request_json TEXT NOT NULL,
    external_task_id TEXT NOT NULL UNIQUE, attempt INTEGER NOT NULL DEFAULT 1, task_id TEXT,
    status TEXT NOT NULL, video_id TEXT, video_url TEXT, file TEXT NOT NULL, sha256 TEXT,
    size INTEGER, error TEXT, submitted_at REAL, finished_at REAL, updated_at REAL NOT NULL,
    possible_duplicate INTEGER NOT NULL DEFAULT 0
);
"""


def wire_json(body: Mapping[str, object]) -> str:
    """How schema 2 stored a request: its wire body, canonically encoded."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_schema_2(path: Path) -> dict[str, tuple[str, str | None, str]]:
    """A schema-2 journal made by hand: two identical prompts (keys ``<hash>#1``, ``#2``), one
    row with its own id and an extra field, in three states. Returns external id -> (prompt,
    task id, status)."""
    bodies = [
        ({"prompt": "the same sea"}, "kb-b2-1", "t-1", "done"),
        ({"prompt": "the same sea"}, "kb-b2-2", "t-2", "processing"),
        ({"prompt": "own", "external_task_id": "mine", "sound": "on"}, "mine", None, "pending"),
    ]
    occurrences: dict[str, int] = {}
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(SCHEMA_2)
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("schema", "2"), ("batch_id", "b2"), ("backend", "b"), ("next_id", "4")],
        )
        for number, (body, external, task_id, status) in enumerate(bodies, start=1):
            encoded = wire_json(body)
            digest = hashlib.sha256(encoded.encode()).hexdigest()
            occurrences[digest] = occurrences.get(digest, 0) + 1
            own = body.get("external_task_id")
            key = f"id:{own}" if own else f"{digest}#{occurrences[digest]}"
            db.execute(
                "INSERT INTO rows (row_key, number, line, request_hash, request_json, "
                "external_task_id, task_id, status, file, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (key, number, number, digest, encoded, external, task_id, status, f"{number}.mp4"),
            )
    return {
        external: (str(body["prompt"]), task_id, status)
        for body, external, task_id, status in bodies
    }


SCHEMA_2_PROMPTS = (
    '{"prompt": "the same sea"}\n{"prompt": "the same sea"}\n'
    '{"prompt": "own", "external_task_id": "mine", "extra": {"sound": "on"}}\n'
)


def test_a_schema_2_journal_is_read_as_is_and_migrated_keeping_every_task(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    expected = write_schema_2(path)
    rows = rows_of(tmp_path / "p.jsonl", SCHEMA_2_PROMPTS)
    # Read-only (status, --dry-run): the rows match the file's rows, and nothing is written.
    reader = Journal.open(path, lock=False)
    try:
        assert set(reader.rows()) == {row.key for row in rows}
    finally:
        reader.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)
    journal = Journal.open(path)
    try:
        open_jobs(journal)
        preparation = journal.prepare(rows, backend="b", prompts="p")
        # Every row is known: none is new, so none would be submitted again.
        assert preparation.fresh == frozenset()
        assert preparation.changed == ()
        assert preparation.orphans == ()
        found = {
            record.external_task_id: (record.task_id, record.status)
            for record in preparation.rows.values()
        }
        assert found == {
            external: (task, status) for external, (_, task, status) in expected.items()
        }
        assert [preparation.rows[row.key].request_hash for row in rows] == [
            row.request_hash for row in rows
        ]
        assert journal.meta["schema"] == "4"
    finally:
        journal.close()
    again = Journal.open(path)  # a migrated journal opens as it is
    try:
        assert again.prepare(rows, backend="b", prompts="p").fresh == frozenset()
    finally:
        again.close()


# --- schema 3 (today's journals) to the job store's records ---------------------------------------


def write_schema_3(path: Path) -> list[str]:
    """A schema-3 journal made by hand: job state in the rows (SCHEMA_2 is its layout too),
    requests stored as their ``to_dict()``. Returns the prompts, one row each."""
    rows = [
        ("a", "kb-b3-1", "t-1", "done"),
        ("b", "kb-b3-2", "t-2", "succeeded"),
        ("c", "kb-b3-3", None, "pending"),
        ("gone", "kb-b3-4", "t-4", "processing"),  # no longer in the file
    ]
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(SCHEMA_2)
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("schema", "3"), ("batch_id", "b3"), ("backend", "b"), ("next_id", "5")],
        )
        for number, (prompt, external, task_id, status) in enumerate(rows, start=1):
            encoded = wire_json(ka.Text2VideoRequest(prompt=prompt).to_dict())
            digest = hashlib.sha256(encoded.encode()).hexdigest()
            db.execute(
                "INSERT INTO rows (row_key, number, line, request_hash, request_json, "
                "external_task_id, task_id, status, file, sha256, updated_at, "
                "possible_duplicate) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    f"{digest}#1",
                    number,
                    number,
                    digest,
                    encoded,
                    external,
                    task_id,
                    status,
                    f"{number}.mp4",
                    "f" * 64 if status == "done" else None,
                    int(prompt == "b"),
                ),
            )
    return [prompt for prompt, *_ in rows]


def test_a_schema_3_journal_moves_its_jobs_into_the_job_store_keeping_every_task(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite3"
    write_schema_3(path)
    rows = rows_of(tmp_path / "p.txt", "a\nb\nc\n")
    journal = Journal.open(path)
    try:
        before = {row.external_task_id: row for row in journal.rows().values()}
        open_jobs(journal)
        after = {row.external_task_id: row for row in journal.rows().values()}
        # The same rows, read now from the batch's columns and the jobs' records.
        assert {k: (r.task_id, r.status, r.possible_duplicate) for k, r in after.items()} == {
            k: (r.task_id, r.status, r.possible_duplicate) for k, r in before.items()
        }
        assert journal.meta["schema"] == "4"
        preparation = journal.prepare(rows, backend="b", prompts="p")
        assert preparation.fresh == frozenset()
        assert [row.external_task_id for row in preparation.orphans] == ["kb-b3-4"]
    finally:
        journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        columns = {info[1] for info in db.execute("PRAGMA table_info(rows)")}
        assert not columns & {"task_id", "status", "possible_duplicate"}
        held = {
            row[0]: row[1:]
            for row in db.execute("SELECT id, task_id, status, sent FROM kling_jobs")
        }
    # Every task id kept; the pending row may have been POSTed: it is looked up, not re-sent.
    assert held == {
        "kb-b3-1": ("t-1", "succeed", 1),
        "kb-b3-2": ("t-2", "succeed", 1),
        "kb-b3-3": (None, "queued", 1),
        "kb-b3-4": ("t-4", "processing", 1),
    }


def test_the_journal_store_loads_only_the_rows_of_this_run(tmp_path: Path) -> None:
    """What the client resumes: the planned rows only (an orphan's unfinished task is never
    followed or sent), a row still to do whose task ended comes back as it ended, a done row is
    given back as it ended, and a row with no record yet is a job never sent."""
    path = tmp_path / "j.sqlite3"
    write_schema_3(path)
    journal = Journal.open(path)

    async def run() -> list[ka.JobRecord]:
        jobs = BatchJobs(journal)
        await jobs.open()
        try:
            current = {row.external_task_id: row for row in journal.rows().values()}
            fresh = attrs.evolve(current["kb-b3-3"], external_task_id="kb-b3-9")
            jobs.plan(
                [
                    (current["kb-b3-1"], False),  # done: as it ended
                    (current["kb-b3-2"], True),  # succeeded, clip not saved: as it ended
                    (current["kb-b3-3"], True),  # pending: resumed, looked up first
                    (fresh, True),  # never recorded: never sent
                ]
            )
            return await jobs.load()
        finally:
            await jobs.aclose()

    try:
        loaded = {record.id: record for record in anyio.run(run)}
    finally:
        journal.close()
    assert set(loaded) == {"kb-b3-1", "kb-b3-2", "kb-b3-3", "kb-b3-9"}  # not kb-b3-4
    assert (loaded["kb-b3-1"].status, loaded["kb-b3-1"].finished) == (ka.JobStatus.SUCCEEDED, True)
    # Succeeded with its clip not saved: given back as saved (the run fetches the task again
    # before the download); a record never says less than what happened.
    assert (loaded["kb-b3-2"].status, loaded["kb-b3-2"].task_id) == (ka.JobStatus.SUCCEEDED, "t-2")
    assert loaded["kb-b3-2"].possible_duplicate is True
    assert (loaded["kb-b3-3"].status, loaded["kb-b3-3"].sent) == (ka.JobStatus.QUEUED, True)
    new = loaded["kb-b3-9"]
    assert (new.status, new.sent, new.task_id) == (ka.JobStatus.QUEUED, False, None)
    assert new.request == ka.Text2VideoRequest(prompt="c", external_task_id="kb-b3-9")
