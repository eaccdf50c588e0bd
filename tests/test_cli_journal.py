"""The journal: rows durable before any POST, stable external ids, rows keyed by content,
changed rows, one owner."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import kling_async as ka
from kling_async.cli._journal import Journal, JournalError
from kling_async.cli._prompts import Defaults, PromptRow, load_prompts

from .cli_helpers import run_main, write_prompts


def rows_of(path: Path, text: str) -> tuple[PromptRow, ...]:
    path.write_text(text)
    return load_prompts(path, Defaults(), ka.COMETAPI).rows


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
        journal.apply({key: {"status": "failed", "task_id": "t1", "error": "boom"}})
        restarted = journal.prepare(
            rows, backend="b", prompts="p", restart=lambda r: r.status == "failed"
        ).rows[key]
        assert restarted.external_task_id == first.external_task_id + "-a2"
        assert (restarted.status, restarted.task_id, restarted.error) == ("pending", None, None)
        journal.apply({key: {"status": "failed"}})
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
