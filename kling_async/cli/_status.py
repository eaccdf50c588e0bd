"""``kling-async status DIR``: what the journal says, per state, without touching anything.

It reads the journal of a finished, killed or running batch (WAL mode lets it read while a
batch writes) and checks that each done row's file is still there.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ._journal import STATUSES, JournalError, existing_rows

__all__ = ["show_status"]

_PROBLEM_ROWS = 30


def show_status(console: Console, out: Path, journal_path: Path) -> int:
    """Print the journal's state; 0 if it could be read, 2 if there is none."""
    try:
        found = existing_rows(journal_path)
    except JournalError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False)
        return 2
    if found is None:
        console.print(
            f"error: no journal at {journal_path}: no batch has run with --out {out} "
            "(or pass --journal)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        return 2
    meta, rows = found
    counts = Counter(row.status for row in rows.values())
    missing = [
        row for row in rows.values() if row.status == "done" and not (out / row.file).is_file()
    ]
    console.print(
        f"journal {journal_path}: batch {meta.get('batch_id', '?')}, {len(rows)} rows, "
        f"prompts {meta.get('prompts', '?')}, backend {meta.get('backend', '?')}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
    table.add_column("status")
    table.add_column("rows", justify="right")
    for status in STATUSES:
        if counts[status]:
            table.add_row(status, str(counts[status]))
    console.print(table)
    if missing:
        console.print(
            f"{len(missing)} done rows have lost their file (a rerun downloads them again): "
            + ", ".join(str(row.number) for row in missing[:20]),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    problems = [row for row in rows.values() if row.error and row.status != "done"]
    for row in problems[:_PROBLEM_ROWS]:
        task = f" task {row.task_id}" if row.task_id else ""
        console.print(
            f"row {row.number} (line {row.line}) {row.status}{task}: {row.error}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if len(problems) > _PROBLEM_ROWS:
        console.print(f"... and {len(problems) - _PROBLEM_ROWS} more rows with errors")
    unfinished = len(rows) - counts["done"] - counts["failed"] - counts["rejected"]
    if unfinished:
        console.print(
            f"{unfinished} rows are not finished: rerun the batch command to resume them",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    return 0
