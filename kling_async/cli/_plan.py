"""``batch --dry-run``: what a run would do, from the file and the journal; nothing is sent,
nothing is created (not even the journal or the output directory). With ``--json``, one
``plan`` object on stdout (the steps per row) instead of the table."""

from __future__ import annotations

import sys
from collections import Counter

from rich.console import Console
from rich.table import Table

from ._display import plain
from ._journal import JournalError, JournalRow, existing_rows
from ._messages import say, tell
from ._progress import now_iso, write_json_line
from ._prompts import PromptFile
from ._run import EXIT_OK, EXIT_USAGE
from ._settings import NO_KEY_HINT, BatchSettings

__all__ = ["show_plan"]

_ROWS_SHOWN = 20


def _step(settings: BatchSettings, record: JournalRow | None, request_hash: str) -> str:
    if record is None:
        return "submit"
    if record.request_hash != request_hash:
        return "changed (not sent)"
    if record.status == "done" and (settings.out / record.file).is_file():
        return "done (skip)"
    if record.status == "elsewhere":
        return "another machine's when last run (Redis says at run time)"
    if record.status in ("failed", "rejected"):
        return "submit again" if settings.retry_failed else f"{record.status} (skip)"
    if record.task_id is not None or record.video_url:
        return "follow or download"
    return "resume (look up by external id, submit if absent)"


def show_plan(settings: BatchSettings, prompt_file: PromptFile, console: Console) -> int:
    try:
        found = existing_rows(settings.journal)
    except JournalError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    meta, records = found if found is not None else ({}, {})
    known_backend = meta.get("backend")
    if known_backend is not None and known_backend != settings.backend:
        say(
            f"error: {settings.journal} belongs to a batch run against {known_backend}, "
            f"not {settings.backend}; use another --out directory"
        )
        return EXIT_USAGE
    rows = prompt_file.rows
    steps = [_step(settings, records.get(row.key), row.request_hash) for row in rows]
    plan = Counter(steps)
    journal = "new" if found is None else f"batch {meta.get('batch_id')}"
    if settings.json:
        write_json_line(
            sys.stdout,
            {
                "event": "plan",
                "time": now_iso(),
                "prompts": str(prompt_file.path),
                "rows": len(rows),
                "backend": settings.backend,
                "rules": settings.profile.name,
                "journal": str(settings.journal),
                "batch_id": None if found is None else meta.get("batch_id"),
                "out": str(settings.out),
                "shared": settings.redis_url is not None,
                "plan": dict(plan),
                "steps": [
                    {
                        "row": row.number,
                        "line": row.line,
                        "step": step,
                        "model_name": row.request.effective_model,
                        "mode": row.request.effective_mode,
                        "duration": row.request.effective_duration,
                        "aspect_ratio": row.request.aspect_ratio or "16:9",
                    }
                    for row, step in zip(rows, steps, strict=True)
                ],
            },
        )
        if not settings.has_key and not settings.emulator:
            tell(f"note: a real run needs a key: {NO_KEY_HINT}")
        return EXIT_OK

    def print_(text: str) -> None:
        console.print(plain(text), soft_wrap=True)

    print_(f"dry run: {len(rows)} rows in {prompt_file.path}; nothing sent")
    print_(
        f"backend {settings.backend} ({settings.profile.name} rules); journal "
        f"{settings.journal} ({journal}); clips into {settings.out}/"
    )
    print_("plan: " + ", ".join(f"{count} {step}" for step, count in plan.items()))
    if settings.redis_url is not None:
        from ._settings import redacted_redis_url

        print_(
            f"shared through Redis at {redacted_redis_url(settings.redis_url)}: each machine "
            "running this file submits only the rows it claims, as its slots free"
        )
    table = Table(header_style="bold")
    for column in ("row", "line", "model", "mode", "sec", "ratio"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=console.width - 50)
    for row in rows[:_ROWS_SHOWN]:
        request = row.request
        table.add_row(
            str(row.number),
            str(row.line),
            plain(request.effective_model),
            plain(request.effective_mode),
            plain(request.effective_duration),
            plain(request.aspect_ratio or "16:9"),
            plain(" ".join(request.prompt.split())),
        )
    console.print(table)
    if len(rows) > _ROWS_SHOWN:
        print_(f"... and {len(rows) - _ROWS_SHOWN} more rows")
    if not settings.has_key and not settings.emulator:
        tell(f"note: a real run needs a key: {NO_KEY_HINT}")
    return EXIT_OK
