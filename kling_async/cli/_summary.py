"""The end of a run: a table for the person, ``summary.json`` for the next program.

``summary.json`` has one entry per row of the prompt file (status, task id, file, seconds,
error) and is replaced atomically, so a script polling it never reads half a file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from ._journal import JournalRow
from ._prompts import PromptRow

__all__ = ["SUMMARY_NAME", "SummaryRow", "build_summary", "render_summary", "write_summary"]

SUMMARY_NAME = "summary.json"
_TABLE_ROWS = 40


@attrs.frozen(kw_only=True)
class SummaryRow:
    row: int
    line: int
    key: str
    status: str
    task_id: str | None
    external_task_id: str | None
    file: str | None
    sha256: str | None
    seconds: float | None
    error: str | None
    prompt: str


def build_summary(
    rows: Sequence[PromptRow],
    journal: Mapping[str, JournalRow],
    *,
    changed: Mapping[str, str],
    errored: Mapping[str, str],
) -> list[SummaryRow]:
    """One entry per file row. ``changed``: key -> why it was not sent; ``errored``: key ->
    the error that stopped the row in this run (a rerun tries it again)."""
    summary = []
    for row in rows:
        record = journal.get(row.key)
        status = record.status if record is not None else "pending"
        error = record.error if record is not None else None
        if row.key in changed:
            status, error = "changed", changed[row.key]
        elif row.key in errored and status not in ("done", "failed", "rejected"):
            status, error = "error", errored[row.key]
        done = record is not None and status == "done"
        summary.append(
            SummaryRow(
                row=row.number,
                line=row.line,
                key=row.key,
                status=status,
                task_id=record.task_id if record is not None else None,
                external_task_id=record.external_task_id if record is not None else None,
                file=record.file if done and record is not None else None,
                sha256=record.sha256 if done and record is not None else None,
                seconds=round(record.seconds, 3)
                if record is not None and record.seconds is not None
                else None,
                error=None if status == "done" else error,
                prompt=row.request.prompt,
            )
        )
    return summary


def write_summary(path: Path, rows: Sequence[SummaryRow], **meta: Any) -> None:
    counts = Counter(row.status for row in rows)
    payload = {
        **meta,
        "counts": dict(sorted(counts.items())),
        "rows": [attrs.asdict(row) for row in rows],
    }
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as file:
        json.dump(payload, file, indent=2, ensure_ascii=False)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _short(text: str | None, width: int) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_summary(console: Console, rows: Sequence[SummaryRow]) -> None:
    """Counts per status, then the rows: all of them for a small batch, else the ones that
    need attention (the full list is in summary.json)."""
    counts = Counter(row.status for row in rows)
    shown = list(rows) if len(rows) <= _TABLE_ROWS else [r for r in rows if r.status != "done"]
    if shown:
        table = Table(title="batch summary", title_justify="left", header_style="bold")
        table.add_column("row", justify="right")
        table.add_column("status")
        table.add_column("seconds", justify="right")
        table.add_column("file / error", overflow="fold")
        for row in shown[:_TABLE_ROWS]:
            detail = row.file if row.status == "done" else _short(row.error, 100)
            seconds = f"{row.seconds:.1f}" if row.seconds is not None else ""
            table.add_row(str(row.row), row.status, seconds, detail or "")
        console.print(table, highlight=False)
        if len(shown) > _TABLE_ROWS:
            console.print(f"... and {len(shown) - _TABLE_ROWS} more rows in {SUMMARY_NAME}")
    console.print(
        ", ".join(f"{count} {status}" for status, count in sorted(counts.items())),
        highlight=False,
    )
