"""``kling-async status DIR``: what the journal says, per state, without touching anything.

It reads the journal of a finished, killed or running batch (WAL mode lets it read while a
batch writes) and checks that each done row's file is still there. Errors in the journal came
from servers: they are escaped, and rows with the same error share one line. A batch shared
through Redis has a journal per machine: this one counts the rows another machine holds as
``elsewhere`` (as of this machine's last run; Redis is not asked).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from ._display import plain
from ._journal import STATUSES, JournalError, JournalRow, existing_rows
from ._messages import say
from ._summary import row_ranges

__all__ = ["show_status", "status_json"]


def _read(out: Path, journal_path: Path) -> tuple[dict[str, str], dict[str, JournalRow]] | None:
    """The journal, or None after saying on stderr why there is none to read."""
    try:
        found = existing_rows(journal_path)
    except JournalError as exc:
        say(f"error: {exc}")
        return None
    if found is None:
        say(
            f"error: no journal at {journal_path}: no batch has run with --out {out} "
            "(or pass --journal)"
        )
    return found


def _unfinished(counts: Counter[str], total: int) -> int:
    ended = counts["done"] + counts["failed"] + counts["rejected"] + counts["elsewhere"]
    return total - ended


def status_json(stream: TextIO, out: Path, journal_path: Path) -> int:
    """``status --json``: one JSON object on ``stream`` (0), or an error on stderr (2).

    ``counts`` per status, ``unfinished`` (rows a rerun would resume), ``missing_files`` (done
    rows whose clip is gone) and ``rows``, every journal row in row order with its status,
    ids, file and error. Result URLs are left out (they may be signed)."""
    found = _read(out, journal_path)
    if found is None:
        return 2
    meta, rows = found
    ordered = sorted(rows.values(), key=lambda row: row.number)
    counts = Counter(row.status for row in ordered)
    missing = {
        row.number for row in ordered if row.status == "done" and not (out / row.file).is_file()
    }
    entries: list[dict[str, Any]] = []
    for row in ordered:
        done = row.status == "done"
        entries.append(
            {
                "row": row.number,
                "line": row.line,
                "status": row.status,
                "external_task_id": row.external_task_id,
                "task_id": row.task_id,
                "file": row.file if done else None,
                "file_missing": row.number in missing,
                "sha256": row.sha256 if done else None,
                "size": row.size if done else None,
                "seconds": round(row.seconds, 3) if row.seconds is not None else None,
                "error": None if done else row.error,
                "possible_duplicate": row.possible_duplicate,
            }
        )
    payload = {
        "journal": str(journal_path),
        "out": str(out),
        "batch_id": meta.get("batch_id"),
        "prompts": meta.get("prompts"),
        "backend": meta.get("backend"),
        "shared": meta.get("shared") == "redis",
        "machine": meta.get("machine"),
        "total": len(ordered),
        "counts": dict(sorted(counts.items())),
        "unfinished": _unfinished(counts, len(ordered)),
        "missing_files": sorted(missing),
        "rows": entries,
    }
    stream.write(json.dumps(payload, indent=2) + "\n")
    stream.flush()
    return 0


_PROBLEM_ROWS = 30


def show_status(console: Console, out: Path, journal_path: Path) -> int:
    """Print the journal's state; 0 if it could be read, 2 if there is none."""

    def show(text: str) -> None:
        console.print(plain(text), soft_wrap=True)

    found = _read(out, journal_path)
    if found is None:
        return 2
    meta, rows = found
    counts = Counter(row.status for row in rows.values())
    missing = [
        row for row in rows.values() if row.status == "done" and not (out / row.file).is_file()
    ]
    show(
        f"journal {journal_path}: batch {meta.get('batch_id', '?')}, {len(rows)} rows, "
        f"prompts {meta.get('prompts', '?')}, backend {meta.get('backend', '?')}"
    )
    if meta.get("shared") == "redis":
        show(
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
        show(
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
        show(line)
    if len(lines) > _PROBLEM_ROWS:
        show(f"... and {len(lines) - _PROBLEM_ROWS} more lines of errors")
    unfinished = _unfinished(counts, len(rows))
    if unfinished:
        show(f"{unfinished} rows are not finished: rerun the batch command to resume them")
    return 0
