"""``kling-async status DIR``: what the journal says, per state, without touching anything.

It reads the journal of a finished, killed or running batch (WAL mode lets it read while a
batch writes) and checks that each done row's file is still there. Errors in the journal came
from servers: they are escaped, and rows with the same error share one line. A batch shared
through Redis has a journal per machine: this one counts the rows another machine holds as
``elsewhere`` (as of this machine's last run; Redis is not asked).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ._display import plain
from ._journal import STATUSES, JournalError, JournalRow, existing_rows
from ._summary import row_ranges

__all__ = ["show_status"]

_PROBLEM_ROWS = 30


def show_status(console: Console, out: Path, journal_path: Path) -> int:
    """Print the journal's state; 0 if it could be read, 2 if there is none."""

    def say(text: str) -> None:
        console.print(plain(text), soft_wrap=True)

    try:
        found = existing_rows(journal_path)
    except JournalError as exc:
        say(f"error: {exc}")
        return 2
    if found is None:
        say(
            f"error: no journal at {journal_path}: no batch has run with --out {out} "
            "(or pass --journal)"
        )
        return 2
    meta, rows = found
    counts = Counter(row.status for row in rows.values())
    missing = [
        row for row in rows.values() if row.status == "done" and not (out / row.file).is_file()
    ]
    say(
        f"journal {journal_path}: batch {meta.get('batch_id', '?')}, {len(rows)} rows, "
        f"prompts {meta.get('prompts', '?')}, backend {meta.get('backend', '?')}"
    )
    if meta.get("shared") == "redis":
        say(
            f"shared through Redis: this is machine {meta.get('machine', '?')}'s journal; "
            "rows other machines hold are elsewhere (their clips are in their out dirs)"
        )
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
    table.add_column("status")
    table.add_column("rows", justify="right")
    for status in STATUSES:
        if counts[status]:
            table.add_row(plain(status), str(counts[status]))
    console.print(table)
    if missing:
        say(
            f"{len(missing)} done rows have lost their file (a rerun downloads them again): "
            + ", ".join(str(row.number) for row in missing[:20])
        )
    problems = [row for row in rows.values() if row.error and row.status != "done"]
    # Rows that never got a task and share an error (an account error stopped them all, say)
    # share a line; a row with a task keeps its own (the task id is what to look up).
    groups: dict[object, list[JournalRow]] = {}
    for row in problems:
        key = (row.status, row.error) if row.task_id is None else row.key
        groups.setdefault(key, []).append(row)
    lines = []
    for group in groups.values():
        first = group[0]
        if len(group) > 1:
            where = f"rows {row_ranges([row.number for row in group])}"
        else:
            where = f"row {first.number} (line {first.line})"
        task = f" task {first.task_id}" if first.task_id else ""
        lines.append(f"{where} {first.status}{task}: {first.error}")
    for line in lines[:_PROBLEM_ROWS]:
        say(line)
    if len(lines) > _PROBLEM_ROWS:
        say(f"... and {len(lines) - _PROBLEM_ROWS} more lines of errors")
    unfinished = (
        len(rows) - counts["done"] - counts["failed"] - counts["rejected"] - counts["elsewhere"]
    )
    if unfinished:
        say(f"{unfinished} rows are not finished: rerun the batch command to resume them")
    return 0
