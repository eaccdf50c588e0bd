"""The end of a run: a table for the person, ``summary.json`` for the next program.

``summary.json`` has one entry per row of the prompt file (status, task id, file, seconds,
error) and is replaced atomically (a random temporary file, never through a link), so a script
polling it never reads half a file. The table lists the rows not done (every row with
``--verbose``), so it reads the same at 5 rows or 500; rows that never got a task and ended
the same way for the same reason (an account error that stopped every submission, say) share
one line. The counts and where the full list is are the run's last line (``_run``).

A batch shared through Redis (``--redis``): each machine's summary is its own out dir's, its
rows held by another machine marked ``elsewhere`` (with that machine, and how the row ended
there as far as Redis knows: ``machine``, ``machine_status``), and ``shared`` holds the counts
of the whole batch as Redis knows them, per machine too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._display import plain
from ._files import replace_file
from ._journal import JournalRow
from ._prompts import PromptRow

__all__ = [
    "SUMMARY_NAME",
    "TABLE_LINES",
    "SummaryRow",
    "batch_counts",
    "build_summary",
    "render_batch_counts",
    "render_summary",
    "write_summary",
]

SUMMARY_NAME = "summary.json"
#: Lines of the final table at most (rows sharing a status and an error share a line).
TABLE_LINES = 20


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
    #: The backend may hold two tasks for this row: its create was sent again after an
    #: outcome no lookup could settle, and the backend may accept a repeated external id.
    possible_duplicate: bool = False
    #: A shared batch: the machine that holds the row, and (for another machine's) how the
    #: row ended there as far as Redis knows (None: not yet). Left out of summary.json when
    #: the batch is not shared.
    machine: str | None = None
    machine_status: str | None = None


def build_summary(
    rows: Sequence[PromptRow],
    journal: Mapping[str, JournalRow],
    *,
    changed: Mapping[str, str],
    errored: Mapping[str, str],
    holders: Mapping[str, tuple[str | None, str | None]] | None = None,
    machine: str | None = None,
) -> list[SummaryRow]:
    """One entry per file row. ``changed``: key -> why it was not sent; ``errored``: key ->
    the error that stopped the row in this run (a rerun tries it again). A shared batch:
    ``holders`` (key -> the machine holding the row and how it ended there) and this
    ``machine``; a row another machine holds is ``elsewhere`` unless its clip is here."""
    summary = []
    for row in rows:
        record = journal.get(row.key)
        status = record.status if record is not None else "pending"
        error = record.error if record is not None else None
        holder, holder_status = (holders or {}).get(row.key, (None, None))
        if row.key in changed:
            status, error = "changed", changed[row.key]
        elif row.key in errored and status not in ("done", "failed", "rejected"):
            status, error = "error", errored[row.key]
        if holders is not None and status != "done" and holder not in (None, machine):
            status, error = "elsewhere", None
        elif status == "elsewhere":  # held by nobody now (its machine left it unfinished)
            status = "pending"
        if status != "elsewhere":
            holder, holder_status = machine, None
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
                possible_duplicate=record is not None and record.possible_duplicate,
                machine=holder,
                machine_status=holder_status,
            )
        )
    return summary


def _shown(attribute: attrs.Attribute[Any], value: object) -> bool:
    return value is not None or attribute.name not in ("machine", "machine_status")


def write_summary(path: Path, rows: Sequence[SummaryRow], **meta: Any) -> None:
    counts = Counter(row.status for row in rows)
    payload = {
        **meta,
        "counts": dict(sorted(counts.items())),
        "rows": [attrs.asdict(row, filter=_shown) for row in rows],
    }
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    replace_file(path, text.encode())


def _short(text: str | None, width: int) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def row_ranges(numbers: Sequence[int], limit: int = 12) -> str:
    """``1-6, 9, 12-13``: row numbers as ranges (at most ``limit`` of them, then ``...``)."""
    ranges: list[list[int]] = []
    for number in sorted(numbers):
        if ranges and number == ranges[-1][1] + 1:
            ranges[-1][1] = number
        else:
            ranges.append([number, number])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    return ", ".join(parts) + (", ..." if len(ranges) > limit else "")


def _lines(rows: Sequence[SummaryRow]) -> list[list[SummaryRow]]:
    """The table's lines: a row each, but rows that never got a task and share a status and
    an error (an account error that stopped them all, say) share one."""
    lines: list[list[SummaryRow]] = []
    shared: dict[tuple[str, str], list[SummaryRow]] = {}
    for row in rows:
        if row.status == "elsewhere":
            key = (row.status, f"{row.machine}: {row.machine_status or 'not finished yet'}")
        elif row.status == "done" or not row.error or row.task_id is not None:
            # A row with a task keeps its own line: the task id is what to look up.
            lines.append([row])
            continue
        else:
            key = (row.status, row.error)
        if key not in shared:
            shared[key] = []
            lines.append(shared[key])
        shared[key].append(row)
    return lines


def render_summary(
    console: Console, rows: Sequence[SummaryRow], *, every_row: bool = False
) -> None:
    """The rows that need attention (every row not done: failed, rejected, stopped, not
    finished), rows that ended the same way for the same reason sharing a line, at most
    :data:`TABLE_LINES` lines (the full list is in summary.json); nothing when every row is
    done. ``every_row`` (``--verbose``): every row, done ones with their file, however many.
    The counts and where the full list is come in the run's last line."""
    shown = list(rows) if every_row else [row for row in rows if row.status != "done"]
    lines = _lines(shown)
    if lines:
        _table(console, rows, lines, every_row=every_row)
    doubtful = [row.row for row in rows if row.possible_duplicate]
    if doubtful:
        console.print(
            plain(
                f"{len(doubtful)} rows may have two tasks (rows {row_ranges(doubtful)}): a create "
                "was sent again after an outcome no lookup could settle, and this backend may "
                f"accept a repeated external_task_id; see possible_duplicate in {SUMMARY_NAME}"
            )
        )


def _table(
    console: Console,
    rows: Sequence[SummaryRow],
    lines: Sequence[Sequence[SummaryRow]],
    *,
    every_row: bool,
) -> None:
    shown = sum(len(group) for group in lines)
    title = f"every row ({len(rows)})" if every_row else f"rows not done: {shown} of {len(rows)}"
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("row", justify="right")
    table.add_column("status")
    if every_row:
        table.add_column("seconds", justify="right")
    table.add_column("task", overflow="fold")
    table.add_column("file / error" if every_row else "error", overflow="fold")
    limit = len(lines) if every_row else TABLE_LINES
    for group in lines[:limit]:
        row = group[0]
        detail: str | None
        if row.status == "elsewhere":
            detail = f"machine {row.machine}: {row.machine_status or 'not finished yet'}"
        else:
            detail = row.file if row.status == "done" else _short(row.error, 100)
        if row.possible_duplicate:
            detail = f"{detail or ''} (possible duplicate)".strip()
        cells: list[Text | str] = [
            plain(row_ranges([member.row for member in group])),
            plain(row.status),
        ]
        if every_row:
            cells.append(
                f"{row.seconds:.1f}" if row.seconds is not None and len(group) == 1 else ""
            )
        cells.append(plain((row.task_id or "") if len(group) == 1 else ""))
        cells.append(plain(detail or ""))
        table.add_row(*cells)
    console.print(table)
    if len(lines) > limit:
        console.print(
            plain(f"... and {len(lines) - limit} more lines in {SUMMARY_NAME} (or use --verbose)")
        )


def batch_counts(holders: Iterable[tuple[str | None, str | None]], machine: str) -> dict[str, Any]:
    """The whole shared batch as Redis knows it: ``counts`` of rows ``done``, ``failed``,
    ``rejected`` (ended), ``unfinished`` (held by a machine, not ended) and ``unclaimed``;
    ``machines``: the ended rows per machine (``here`` is this one)."""
    counts: Counter[str] = Counter()
    machines: dict[str, Counter[str]] = {}
    for holder, final in holders:
        if final is not None:
            counts[final] += 1
            machines.setdefault(holder or "?", Counter())[final] += 1
        else:
            counts["unfinished" if holder is not None else "unclaimed"] += 1
    return {
        "here": machine,
        "counts": dict(sorted(counts.items())),
        "machines": {name: dict(sorted(c.items())) for name, c in sorted(machines.items())},
    }


def render_batch_counts(
    console: Console,
    batch_id: str,
    machine: str,
    holders: Sequence[tuple[str | None, str | None]] | None,
) -> None:
    """``batch 1a2b3c4d5e6f, all machines (as Redis knows): 40 rows: 40 done (21 here, 19
    by host-b-3f2a1c)``."""
    if holders is None:
        console.print(
            plain(f"batch {batch_id}, all machines: Redis could not say at the end (see status)")
        )
        return
    tally = batch_counts(holders, machine)
    done_by = {name: c.get("done", 0) for name, c in tally["machines"].items() if c.get("done")}
    parts = []
    for status, count in tally["counts"].items():
        text = f"{count} {status}"
        if status == "done" and done_by:
            who = [f"{done_by.pop(machine)} here"] if machine in done_by else []
            who += [f"{n} by {name}" for name, n in done_by.items()]
            text += f" ({', '.join(who)})"
        parts.append(text)
    console.print(
        plain(
            f"batch {batch_id}, all machines (as Redis knows): {len(holders)} rows: "
            + ", ".join(parts)
        )
    )
